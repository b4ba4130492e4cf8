//! Reports up the tunnel: observations that changed, the queued events (durable until
//! acknowledged), and on every `watch_report_ms` all observations, the gateway's health and the
//! provider inventory summary. One report is unacknowledged at a time (that bounds their rate);
//! one not acknowledged within a minute, or cut by a new tunnel, is sent again (the broker records
//! each event once, by its id).

use std::sync::Arc;
use std::time::{Duration, Instant};

use pcg_proto::machines::{EndpointHealth, Health, MachineState, Observed};
use pcg_proto::v1::gateway_frame::Kind as GKind;
use pcg_proto::v1::{GatewayFrame, MachineObservation, WatchReport, WatchReportAck};
use serde_json::json;

use super::observe::{Inventory, Read, ReadError};
use crate::store::machines::LocalMachine;
use crate::store::now_ms;
use crate::Gateway;

/// Events per report.
const EVENTS_PER_REPORT: usize = 500;
/// A report not acknowledged within this is sent again.
const ACK_WAIT: Duration = Duration::from_secs(60);

/// The report under way and when the last periodic one went.
#[derive(Default)]
pub(super) struct ReportState {
    next_seq: u64,
    in_flight: Option<InFlight>,
    last_periodic: Option<Instant>,
}

struct InFlight {
    seq: u64,
    /// Keys of the events it carried.
    events: Vec<Vec<u8>>,
    /// Machines whose observations it carried.
    machines: Vec<String>,
    sent: Instant,
}

impl ReportState {
    /// Forgets the report under way (a new tunnel); with `periodic`, the next report carries
    /// everything.
    pub(super) fn reset(&mut self, periodic: bool) {
        self.in_flight = None;
        if periodic {
            self.last_periodic = None;
        }
    }
}

/// Whether two observations differ in more than their times.
fn material(a: &Observed, b: &Observed) -> bool {
    let strip = |o: &Observed| Observed {
        observed_ms: 0,
        last_seen_ms: None,
        ..o.clone()
    };
    strip(a) != strip(b)
}

/// Keeps a machine's latest observation; a material change is reported with the next report.
pub(super) fn observed(gw: &Gateway, machine_id: &str, o: Observed) {
    let mut inner = gw.watch.lock();
    let changed = inner
        .observed
        .get(machine_id)
        .is_none_or(|p| material(p, &o));
    if changed {
        inner.unreported.insert(machine_id.to_string());
    }
    inner.observed.insert(machine_id.to_string(), o);
}

/// Records what each endpoint read showed (reachability, inventory summary, cost).
pub(super) fn record_reads(gw: &Gateway, reads: &[Read], machines: &[LocalMachine]) {
    let now = now_ms();
    let mut inner = gw.watch.lock();
    for r in reads {
        let key = (r.provider.as_str().to_string(), r.name.clone());
        let e = inner
            .endpoints
            .entry(key)
            .or_insert_with(|| EndpointHealth {
                provider: r.provider.as_str().into(),
                name: r.name.clone(),
                ..EndpointHealth::default()
            });
        e.machines = machines
            .iter()
            .filter_map(|m| m.declaration.as_ref())
            .filter(|d| d.provider() == r.provider && d.endpoint() == r.name)
            .count();
        e.read_requests = r.requests;
        e.read_ms = Some(r.ms);
        match &r.outcome {
            Ok(inv) => {
                e.reachable = true;
                e.last_ok_ms = Some(now);
                match inv {
                    Inventory::Vms(vms) => {
                        let real = vms.iter().filter(|v| !v.template);
                        e.vms = Some(real.clone().count());
                        e.powered_on = Some(
                            real.filter(|v| v.power == pcg_provider::PowerState::On)
                                .count(),
                        );
                        e.templates = Some(vms.iter().filter(|v| v.template).count());
                    }
                    Inventory::Nodes(nodes) => {
                        e.power = nodes.values().find_map(|p| {
                            p.as_ref().ok().and_then(|p| {
                                serde_json::to_value(p)
                                    .ok()
                                    .and_then(|v| v.as_str().map(str::to_string))
                            })
                        });
                    }
                }
            }
            Err(ReadError::Invalid(m) | ReadError::Unreachable(m)) => {
                e.reachable = false;
                e.last_error = Some(m.clone());
                e.last_error_ms = Some(now);
            }
        }
    }
    // Endpoints no longer enrolled nor used drop out of the report.
    let vs = gw.store.endpoint_names("vsphere");
    let os = gw.store.endpoint_names("openstack");
    let bm = gw.bare_metal.names();
    inner.endpoints.retain(|(p, n), e| {
        e.machines > 0
            || match p.as_str() {
                "vsphere" => vs.contains(n),
                "openstack" => os.contains(n),
                _ => bm.contains(n),
            }
    });
}

/// The gateway's health now.
async fn health(gw: &Gateway) -> Health {
    let st = gw.status();
    let durable = gw.store.probe_write().await;
    let inner = gw.watch.lock();
    Health {
        at_ms: now_ms(),
        version: crate::VERSION.into(),
        uptime_s: st.uptime_s,
        tunnel: json!({
            "state": st.tunnel.state,
            "transport": st.tunnel.transport,
            "rtt_ms": st.tunnel.rtt_ms,
            "connects": st.tunnel.connects,
            "connected_since_ms": st.tunnel.connected_since_ms,
            "last_error": st.tunnel.last_error,
        }),
        store: json!({
            "durable_writes": durable.is_ok(),
            "error": durable.err().map(|e| e.to_string()),
            "journal_entries": st.journal_entries,
            "outbox_depth": st.outbox_depth,
            "queued_events": gw.store.watch_event_depth(),
        }),
        watch: json!({
            "machines": inner.observed.len(),
            "interval_ms": gw.cfg.watch_interval_ms,
            "cycles": inner.cycles,
            "last_cycle_ms": inner.last_cycle_ms,
            "last_cycle_at_ms": inner.last_cycle_at_ms,
            "actions_under_way": inner.busy.len(),
        }),
        endpoints: inner.endpoints.values().cloned().collect(),
    }
}

/// Sends a report when there is something to say and none is unacknowledged; every
/// `watch_report_ms` one with everything.
pub(super) async fn send(gw: &Arc<Gateway>, force_periodic: bool) {
    let Some(tx) = gw.outbound() else {
        return;
    };
    let every = Duration::from_millis(gw.cfg.watch_report_ms.max(1000));
    let periodic = {
        let mut inner = gw.watch.lock();
        if let Some(f) = &inner.report.in_flight {
            if f.sent.elapsed() < ACK_WAIT {
                return;
            }
            tracing::warn!(seq = f.seq, "watch report not acknowledged; sending again");
            let again = f.machines.clone();
            inner.unreported.extend(again);
            inner.report.in_flight = None;
        }
        force_periodic
            || inner
                .report
                .last_periodic
                .is_none_or(|t| t.elapsed() >= every)
    };
    let events = match gw.store.watch_events(EVENTS_PER_REPORT) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!("cannot read queued machine events: {e}");
            Vec::new()
        }
    };
    let health = if periodic {
        Some(health(gw).await)
    } else {
        None
    };
    let mut inner = gw.watch.lock();
    if inner.report.in_flight.is_some() {
        return; // another send won meanwhile
    }
    let machines: Vec<String> = if periodic {
        inner.observed.keys().cloned().collect()
    } else {
        inner.unreported.iter().cloned().collect()
    };
    if machines.is_empty() && events.is_empty() && health.is_none() {
        return;
    }
    let observations = machines
        .iter()
        .filter_map(|id| {
            inner.observed.get(id).map(|o| MachineObservation {
                machine_id: id.clone(),
                observed: serde_json::to_vec(o).expect("observations serialise"),
            })
        })
        .collect();
    inner.report.next_seq += 1;
    let seq = inner.report.next_seq;
    let frame = GatewayFrame {
        kind: Some(GKind::WatchReport(WatchReport {
            seq,
            observations,
            events: events
                .iter()
                .map(|(_, e)| serde_json::to_vec(e).expect("events serialise"))
                .collect(),
            health: health
                .map(|h| serde_json::to_vec(&h).expect("health serialises"))
                .unwrap_or_default(),
        })),
    };
    if tx.try_send(frame).is_err() {
        return; // the tunnel is busy or gone: next time
    }
    for m in &machines {
        inner.unreported.remove(m);
    }
    if periodic {
        inner.report.last_periodic = Some(Instant::now());
    }
    inner.report.in_flight = Some(InFlight {
        seq,
        events: events.into_iter().map(|(k, _)| k).collect(),
        machines,
        sent: Instant::now(),
    });
}

/// The broker stored a report: its events are dropped from the queue, and the next report may
/// go (at once, when events are waiting).
pub fn on_ack(gw: &Arc<Gateway>, ack: WatchReportAck) {
    let done = {
        let mut inner = gw.watch.lock();
        match &inner.report.in_flight {
            Some(f) if f.seq == ack.seq => inner.report.in_flight.take(),
            _ => None,
        }
    };
    let Some(f) = done else { return };
    if !ack.error.is_empty() {
        tracing::warn!(
            seq = ack.seq,
            "the SaaS could not store a watch report: {}",
            ack.error
        );
        let mut inner = gw.watch.lock();
        inner.unreported.extend(f.machines);
        return;
    }
    if let Err(e) = gw.store.drop_watch_events(&f.events) {
        tracing::warn!("cannot drop acknowledged machine events (they will be sent again): {e}");
    }
    {
        // A deleted machine's last observation was delivered: forget it.
        let mut inner = gw.watch.lock();
        for m in &f.machines {
            if inner
                .observed
                .get(m)
                .is_some_and(|o| o.state == MachineState::Deleted)
                && !inner.unreported.contains(m)
            {
                inner.observed.remove(m);
            }
        }
    }
    if !f.events.is_empty() || gw.store.watch_event_depth() > 0 {
        let gw = gw.clone();
        tokio::spawn(async move { send(&gw, false).await });
    }
}
