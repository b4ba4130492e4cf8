//! Declared machines and what gateways report about them, in the SaaS store.
//!
//! - `machines`: id → [`MachineRecord`] (the declaration, its generation, what the gateway applied
//!   and last observed); `machines_by_gateway`: `gateway \0 id` → `[]`, so a gateway's set is a
//!   prefix scan (the full sync on every tunnel).
//! - `machine_event_ids`: the id a gateway gave each `machine.*` event → its seq, so a report sent
//!   again records nothing twice (removed with the event by retention).
//! - `health`: `gateway \0 received_ms \0 seq` → [`HealthRecord`]: the gateways' health and
//!   inventory reports, newest last, deleted after `health_retention_hours`.

use pcg_proto::machines::{Declaration, Health, MachineEvent, Observed};
use serde::{Deserialize, Serialize};

use super::{all, get, now_ms, put, Event, Store, StoreError, Topic};

/// A declared machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineRecord {
    pub id: String,
    pub tenant_id: String,
    pub gateway_id: String,
    pub declaration: Declaration,
    /// Bumped by every change (PUT, DELETE).
    pub generation: u64,
    /// The generation the gateway stored (acknowledged); it converges to it.
    pub applied_generation: u64,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// The declaration was deleted; the record goes once the gateway reports the machine deleted.
    pub deleting: bool,
    /// What the gateway last reported, and when the SaaS received it.
    pub observed: Option<Observed>,
    pub observed_received_ms: Option<i64>,
    /// The last `machine.drift` event: when, and its details (before, after, drift).
    pub last_drift: Option<LastDrift>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastDrift {
    pub at_ms: i64,
    pub details: serde_json::Value,
}

/// A health report as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealthRecord {
    pub gateway_id: String,
    pub received_ms: i64,
    pub health: Health,
}

/// Which events to list.
#[derive(Debug, Default, Clone)]
pub struct EventFilter {
    pub gateway_id: Option<String>,
    pub machine_id: Option<String>,
    /// An exact kind (`machine.heal`), or a prefix ending in `.` (`machine.`).
    pub kind: Option<String>,
    /// Only alerts (true) or only non-alerts (false).
    pub alert: Option<bool>,
}

impl EventFilter {
    pub fn keeps(&self, e: &Event) -> bool {
        self.gateway_id
            .as_deref()
            .is_none_or(|g| e.gateway_id.as_deref() == Some(g))
            && self
                .machine_id
                .as_deref()
                .is_none_or(|m| e.machine_id.as_deref() == Some(m))
            && self.kind.as_deref().is_none_or(|k| {
                if k.ends_with('.') {
                    e.kind.starts_with(k)
                } else {
                    e.kind == k
                }
            })
            && self.alert.is_none_or(|a| e.alert == a)
    }
}

fn index_key(gateway_id: &str, id: &str) -> Vec<u8> {
    let mut k = gateway_id.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn prefix(gateway_id: &str) -> Vec<u8> {
    let mut k = gateway_id.as_bytes().to_vec();
    k.push(0);
    k
}

impl Store {
    /// Writes a machine record and its gateway index (not yet flushed).
    pub fn put_machine(&self, m: &MachineRecord) -> Result<(), StoreError> {
        put(&self.machines, m.id.as_bytes(), m)?;
        self.machines_by_gateway
            .insert(index_key(&m.gateway_id, &m.id), &[])?;
        Ok(())
    }

    pub fn machine(&self, id: &str) -> Result<Option<MachineRecord>, StoreError> {
        get(&self.machines, "machines", id.as_bytes())
    }

    /// The machines declared on a gateway, by id.
    pub fn machines_of(&self, gateway_id: &str) -> Result<Vec<MachineRecord>, StoreError> {
        let p = prefix(gateway_id);
        let mut out = Vec::new();
        for k in self.machines_by_gateway.scan_prefix(&p).keys() {
            let k = k?;
            if let Some(m) = get::<MachineRecord>(&self.machines, "machines", &k[p.len()..])? {
                out.push(m);
            }
        }
        Ok(out)
    }

    /// How many machines are declared on a gateway (index keys only).
    pub fn machine_count(&self, gateway_id: &str) -> usize {
        self.machines_by_gateway
            .scan_prefix(prefix(gateway_id))
            .keys()
            .count()
    }

    /// Every machine record (retention and tests).
    pub fn all_machines(&self) -> Result<Vec<MachineRecord>, StoreError> {
        all(&self.machines, "machines")
    }

    /// Changes a machine atomically; `None` when it does not exist.
    pub fn update_machine(
        &self,
        id: &str,
        f: impl Fn(&mut MachineRecord),
    ) -> Result<Option<MachineRecord>, StoreError> {
        let mut out = None;
        self.machines.fetch_and_update(id.as_bytes(), |old| {
            let mut m: MachineRecord = serde_json::from_slice(old?).ok()?;
            f(&mut m);
            let bytes = serde_json::to_vec(&m).expect("records serialise");
            out = Some(m);
            Some(bytes)
        })?;
        Ok(out)
    }

    pub fn remove_machine(&self, m: &MachineRecord) -> Result<(), StoreError> {
        self.machines.remove(m.id.as_bytes())?;
        self.machines_by_gateway
            .remove(index_key(&m.gateway_id, &m.id))?;
        Ok(())
    }

    /// Records an event about a machine (its declaration changed: `machine.declared`, ...).
    pub fn event_for_machine(
        &self,
        tenant_id: &str,
        gateway_id: &str,
        machine_id: &str,
        kind: &str,
        message: String,
    ) -> Result<(), StoreError> {
        self.put_event(Event {
            seq: 0,
            at_ms: now_ms(),
            tenant_id: Some(tenant_id.to_string()),
            gateway_id: Some(gateway_id.to_string()),
            kind: kind.to_string(),
            message,
            machine_id: Some(machine_id.to_string()),
            alert: false,
            details: None,
            source_id: None,
        })
        .map(|_| ())
    }

    /// Records a gateway's machine event once (by its id); returns false when it already was.
    pub fn machine_event(
        &self,
        tenant_id: &str,
        gateway_id: &str,
        ev: &MachineEvent,
    ) -> Result<bool, StoreError> {
        if self.machine_event_ids.get(ev.id.as_bytes())?.is_some() {
            return Ok(false);
        }
        let e = Event {
            seq: 0,
            // The gateway's clock says when it happened; the SaaS's bounds it (a skewed clock
            // cannot put an event in the future or before retention).
            at_ms: ev.at_ms.clamp(now_ms() - 86_400_000, now_ms()),
            tenant_id: Some(tenant_id.to_string()),
            gateway_id: Some(gateway_id.to_string()),
            kind: ev.kind.clone(),
            message: ev.message.clone(),
            machine_id: Some(ev.machine_id.clone()),
            alert: ev.alert,
            details: (!ev.details.is_null()).then(|| ev.details.clone()),
            source_id: Some(ev.id.clone()),
        };
        let seq = self.put_event(e)?;
        self.machine_event_ids
            .insert(ev.id.as_bytes(), &seq.to_be_bytes())?;
        Ok(true)
    }

    /// Stores a health report of a gateway of `tenant_id` (not yet flushed).
    pub fn put_health(
        &self,
        tenant_id: &str,
        gateway_id: &str,
        health: &Health,
    ) -> Result<(), StoreError> {
        self.commit(&super::Op::HealthReported {
            tenant_id: tenant_id.to_string(),
            gateway_id: gateway_id.to_string(),
            received_ms: now_ms(),
            health: health.clone(),
        })
        .map(|_| ())
    }

    /// Writes a health report as number `seq` (see [`super::Op::HealthReported`]).
    pub(super) fn put_health_at(
        &self,
        seq: u64,
        tenant_id: &str,
        rec: &HealthRecord,
    ) -> Result<(), StoreError> {
        let mut k = prefix(&rec.gateway_id);
        k.extend_from_slice(&u64::try_from(rec.received_ms).unwrap_or(0).to_be_bytes());
        k.push(0);
        k.extend_from_slice(&seq.to_be_bytes());
        put(&self.health, &k, rec)?;
        self.feed
            .record(tenant_id, seq, Topic::Health, rec.received_ms, &k)
    }

    /// One health report by its key (a feed entry's reference).
    pub fn health_by_key(&self, key: &[u8]) -> Result<Option<HealthRecord>, StoreError> {
        get(&self.health, "health", key)
    }

    /// A gateway's health reports, newest first.
    pub fn health_history(
        &self,
        gateway_id: &str,
        limit: usize,
    ) -> Result<Vec<HealthRecord>, StoreError> {
        let mut out = Vec::new();
        for v in self.health.scan_prefix(prefix(gateway_id)).values().rev() {
            let v = v?;
            out.push(serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                tree: "health",
                message: e.to_string(),
            })?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Deletes health reports received before `cutoff_ms`; returns how many. Each gateway's
    /// reports are in time order, so this reads only what it deletes and one more per gateway.
    pub fn prune_health(&self, cutoff_ms: i64) -> Result<usize, StoreError> {
        let cutoff = u64::try_from(cutoff_ms).unwrap_or(0);
        let mut n = 0;
        let mut from: Vec<u8> = Vec::new();
        loop {
            let Some(k) = self
                .health
                .range(from.clone()..)
                .keys()
                .next()
                .transpose()?
            else {
                return Ok(n);
            };
            let Some(cut) = k.iter().position(|b| *b == 0) else {
                self.health.remove(&k)?;
                continue;
            };
            let at = k
                .get(cut + 1..cut + 9)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(0, u64::from_be_bytes);
            if at < cutoff {
                self.health.remove(&k)?;
                n += 1;
            } else {
                // This gateway's remaining reports are newer: on to the next gateway.
                from = k[..cut].to_vec();
                from.push(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcg_proto::machines::MachineState;

    fn record(id: &str, gw: &str) -> MachineRecord {
        MachineRecord {
            id: id.into(),
            tenant_id: "t1".into(),
            gateway_id: gw.into(),
            declaration: serde_json::from_value(
                serde_json::json!({"name": "n", "bare_metal": {"bmc": "b"}}),
            )
            .expect("declaration"),
            generation: 1,
            applied_generation: 0,
            created_ms: now_ms(),
            updated_ms: now_ms(),
            deleting: false,
            observed: None,
            observed_received_ms: None,
            last_drift: None,
        }
    }

    #[test]
    fn machines_by_gateway_events_once_and_health_retention() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(dir.path()).expect("open");
        s.put_machine(&record("m1", "gw_a")).expect("put");
        s.put_machine(&record("m2", "gw_a")).expect("put");
        s.put_machine(&record("m3", "gw_ab")).expect("put");
        let ids = |g: &str| -> Vec<String> {
            s.machines_of(g)
                .expect("list")
                .into_iter()
                .map(|m| m.id)
                .collect()
        };
        assert_eq!(ids("gw_a"), vec!["m1", "m2"]);
        let m = s
            .update_machine("m1", |m| {
                m.observed = Some(Observed {
                    state: MachineState::InSync,
                    ..Observed::default()
                })
            })
            .expect("update")
            .expect("known");
        assert_eq!(
            s.machine("m1").expect("get").expect("known").observed,
            m.observed
        );
        s.remove_machine(&m).expect("remove");
        assert_eq!(ids("gw_a"), vec!["m2"]);
        assert!(s.update_machine("m1", |_| {}).expect("update").is_none());

        let ev = MachineEvent {
            id: "mev_1".into(),
            machine_id: "m2".into(),
            kind: pcg_proto::machines::kinds::ALERT.into(),
            alert: true,
            message: "off".into(),
            details: serde_json::json!({"before": "on"}),
            at_ms: now_ms(),
        };
        assert!(s.machine_event("t1", "gw_a", &ev).expect("event"));
        assert!(!s.machine_event("t1", "gw_a", &ev).expect("again"));
        let f = EventFilter {
            alert: Some(true),
            kind: Some("machine.".into()),
            ..EventFilter::default()
        };
        let listed = s.events_where(Some("t1"), None, &f, 10).expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].machine_id.as_deref(), Some("m2"));
        let f = EventFilter {
            alert: Some(false),
            ..EventFilter::default()
        };
        assert!(s
            .events_where(Some("t1"), None, &f, 10)
            .expect("list")
            .is_empty());
        // Retention removes the id too: the same id would be recorded again.
        assert_eq!(s.prune_events(now_ms() + 1).expect("prune"), 1);
        assert!(s.machine_event("t1", "gw_a", &ev).expect("event"));

        s.put_health("t", "gw_a", &Health::default())
            .expect("health");
        s.put_health("t", "gw_a", &Health::default())
            .expect("health");
        s.put_health("t", "gw_ab", &Health::default())
            .expect("health");
        assert_eq!(s.health_history("gw_a", 10).expect("history").len(), 2);
        assert_eq!(s.health_history("gw_ab", 10).expect("history").len(), 1);
        assert_eq!(s.prune_health(now_ms() - 60_000).expect("prune"), 0);
        assert_eq!(s.prune_health(now_ms() + 1).expect("prune"), 3);
        assert!(s.health_history("gw_a", 10).expect("history").is_empty());
    }
}
