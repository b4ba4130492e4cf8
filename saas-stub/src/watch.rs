//! The broker's side of declared machines and the watch loop.
//!
//! - On every tunnel, after Welcome and the replay of pending commands, the gateway gets its
//!   whole declared set ([`on_connect`], `MachineSync{full}` in frames of bounded size); every
//!   later change is pushed as it is stored ([`push`]). Both send under one lock, so a change
//!   stored while a full set is being read is never overtaken by that (older) set.
//! - `MachinesApplied`: the generations the gateway stored ([`applied`]).
//! - `WatchReport`: observations, `machine.*` events (recorded once each, by their id) and the
//!   gateway's health; stored, made durable (group commit, never blocking the tunnel's reading),
//!   then acknowledged ([`report`]). A machine whose deletion the gateway reports done is
//!   removed.

use std::sync::Arc;

use pcg_proto::machines::{kinds, Health, MachineEvent, MachineState, Observed};
use pcg_proto::v1::broker_frame::Kind as BKind;
use pcg_proto::v1::{
    BrokerFrame, DeclaredMachine, MachineSync, MachinesApplied, WatchReport, WatchReportAck,
};
use tokio::sync::Notify;

use crate::app::{printable, App};
use crate::store::machines::LastDrift;
use crate::store::{now_ms, MachineRecord};

use crate::broker::Tx;

/// Declarations per `MachineSync` frame of a full set, and bytes (frames stay far below the
/// tunnel's 16 MiB message limit).
const FULL_CHUNK: usize = 500;
const FULL_CHUNK_BYTES: usize = 4 << 20;

/// Largest `details` of an event kept as sent (bigger ones are replaced by a note).
const MAX_DETAILS: usize = 16 * 1024;

fn declared(m: &MachineRecord) -> DeclaredMachine {
    DeclaredMachine {
        machine_id: m.id.clone(),
        generation: m.generation,
        declaration: if m.deleting {
            Vec::new()
        } else {
            serde_json::to_vec(&m.declaration).expect("declarations serialise")
        },
        deleted: m.deleting,
    }
}

fn frame(full: bool, more: bool, machines: Vec<DeclaredMachine>) -> BrokerFrame {
    BrokerFrame {
        kind: Some(BKind::Machines(MachineSync {
            full,
            machines,
            more,
        })),
    }
}

/// Hands a changed declaration to its gateway's tunnel, if one is up. A tunnel that cannot take
/// it now is closed: the gateway redials and gets the whole set.
pub fn push(app: &Arc<App>, m: &MachineRecord) {
    let _order = app
        .machine_sync
        .lock()
        .expect("machine sync lock is never poisoned");
    let Some(t) = app.tunnels.get(&m.gateway_id) else {
        return;
    };
    if t.tx
        .try_send(Ok(frame(false, false, vec![declared(m)])))
        .is_err()
    {
        tracing::warn!(gateway = %m.gateway_id, "tunnel congested; closing it so that the gateway redials and gets its machines again");
        app.tunnels.close(
            &m.gateway_id,
            "tunnel congested; redial for the declared machines",
            false,
        );
    }
}

/// Sends the gateway its whole declared set. Returns false when the tunnel could not take it
/// (the session then ends; the gateway redials).
pub fn on_connect(app: &App, gateway_id: &str, tx: &Tx) -> bool {
    let _order = app
        .machine_sync
        .lock()
        .expect("machine sync lock is never poisoned");
    let all = match app.store.machines_of(gateway_id) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(gateway = %gateway_id, "cannot read the declared machines: {e}");
            return false;
        }
    };
    let mut chunks: Vec<Vec<DeclaredMachine>> = vec![Vec::new()];
    let mut bytes = 0;
    for m in &all {
        let d = declared(m);
        let size = d.declaration.len() + d.machine_id.len() + 16;
        let last = chunks.last_mut().expect("never empty");
        if !last.is_empty() && (last.len() >= FULL_CHUNK || bytes + size > FULL_CHUNK_BYTES) {
            chunks.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        chunks.last_mut().expect("never empty").push(d);
    }
    let n = chunks.len();
    for (i, c) in chunks.into_iter().enumerate() {
        if tx.try_send(Ok(frame(true, i + 1 < n, c))).is_err() {
            return false;
        }
    }
    true
}

/// Records the generations a gateway stored (made durable with the next group commit).
pub fn applied(app: &App, gateway_id: &str, a: MachinesApplied) {
    for g in a.machines.into_iter().take(100_000) {
        let r = app.store.update_machine(&g.machine_id, |m| {
            if m.gateway_id == gateway_id && g.generation <= m.generation {
                m.applied_generation = m.applied_generation.max(g.generation);
            }
        });
        if let Err(e) = r {
            tracing::warn!(gateway = %gateway_id, machine = %printable(&g.machine_id), "cannot record an applied generation: {e}");
        }
    }
}

/// Stores one observation of a machine of this gateway; removes the machine when its deletion
/// is reported done.
fn observe(app: &App, gateway_id: &str, machine_id: &str, o: Observed) {
    let Ok(Some(cur)) = app.store.machine(machine_id) else {
        return;
    };
    if cur.gateway_id != gateway_id {
        tracing::warn!(gateway = %gateway_id, machine = %printable(machine_id), "observation of another gateway's machine ignored");
        return;
    }
    if o.state == MachineState::Deleted && cur.deleting && o.generation >= cur.generation {
        if let Err(e) = app.store.remove_machine(&cur) {
            tracing::warn!(machine = %cur.id, "cannot remove a deleted machine: {e}");
        }
        return;
    }
    let now = now_ms();
    let r = app.store.update_machine(machine_id, |m| {
        // An observation of an older generation never replaces one of a newer.
        if m.observed
            .as_ref()
            .is_none_or(|p| o.generation >= p.generation)
        {
            m.observed = Some(o.clone());
            m.observed_received_ms = Some(now);
        }
    });
    if let Err(e) = r {
        tracing::warn!(machine = %cur.id, "cannot store an observation: {e}");
    }
}

/// Records one event of this gateway (once, by its id).
fn event(app: &App, tenant_id: &str, gateway_id: &str, mut ev: MachineEvent) {
    if !crate::app::plausible_id(&ev.id)
        || !crate::app::plausible_id(&ev.machine_id)
        || !ev.kind.starts_with("machine.")
        || !crate::app::commands::valid_kind(&ev.kind)
    {
        tracing::warn!(gateway = %gateway_id, kind = %printable(&ev.kind), "malformed machine event ignored");
        return;
    }
    // A gateway speaks for its own machines only (a deleted one is no longer stored).
    let machine = app.store.machine(&ev.machine_id).ok().flatten();
    if machine.as_ref().is_some_and(|m| m.gateway_id != gateway_id) {
        tracing::warn!(gateway = %gateway_id, machine = %printable(&ev.machine_id), "event about another gateway's machine ignored");
        return;
    }
    ev.message = printable(&ev.message);
    if serde_json::to_vec(&ev.details).map_or(0, |b| b.len()) > MAX_DETAILS {
        ev.details = serde_json::json!({"note": "details too large; dropped"});
    }
    match app.store.machine_event(tenant_id, gateway_id, &ev) {
        Ok(true) if ev.kind == kinds::DRIFT && machine.is_some() => {
            let last = LastDrift {
                at_ms: ev.at_ms,
                details: ev.details.clone(),
            };
            let _ = app.store.update_machine(&ev.machine_id, |m| {
                m.last_drift = Some(last.clone());
            });
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(gateway = %gateway_id, "cannot record a machine event: {e}"),
    }
}

/// Stores a report, then (once durable, in a task: the tunnel keeps reading) acknowledges it.
pub fn report(
    app: &Arc<App>,
    tenant_id: &str,
    gateway_id: &str,
    r: WatchReport,
    tx: &Tx,
    close: &Arc<Notify>,
) {
    for o in r.observations.into_iter().take(100_000) {
        match serde_json::from_slice::<Observed>(&o.observed) {
            Ok(obs) => observe(app, gateway_id, &o.machine_id, obs),
            Err(e) => tracing::warn!(gateway = %gateway_id, "unreadable observation ignored: {e}"),
        }
    }
    for e in r.events.into_iter().take(10_000) {
        match serde_json::from_slice::<MachineEvent>(&e) {
            Ok(ev) => event(app, tenant_id, gateway_id, ev),
            Err(e) => {
                tracing::warn!(gateway = %gateway_id, "unreadable machine event ignored: {e}")
            }
        }
    }
    let mut error = String::new();
    let mut health = None;
    if !r.health.is_empty() {
        match serde_json::from_slice::<Health>(&r.health) {
            Ok(h) => {
                health = Some(crate::store::Op::HealthReported {
                    tenant_id: tenant_id.to_string(),
                    gateway_id: gateway_id.to_string(),
                    received_ms: crate::store::now_ms(),
                    health: h,
                })
            }
            Err(e) => {
                tracing::warn!(gateway = %gateway_id, "unreadable health report ignored: {e}")
            }
        }
    }
    let (app2, tx2, close2, seq) = (app.clone(), tx.clone(), close.clone(), r.seq);
    app.tasks.spawn(async move {
        if let Some(op) = health {
            if let Err(e) = app2.commit(op).await {
                error = format!("the SaaS could not store the health report: {e}");
            }
        }
        if let Err(e) = app2.store.flush().await {
            tracing::error!("cannot make a watch report durable: {e}");
            error = format!("the SaaS could not store the report: {e}");
        }
        let ack = BrokerFrame {
            kind: Some(BKind::WatchReportAck(WatchReportAck { seq, error })),
        };
        if tx2.try_send(Ok(ack)).is_err() {
            close2.notify_one();
        }
    });
}
