//! The watch loop's durable state (see [`crate::watch`]):
//!
//! - `machines`: machine id → [`LocalMachine`]: the declaration the SaaS sent (with its
//!   generation) and what the loop keeps about the machine (its VM's id and earlier ids, the
//!   incarnation its create marks, heals within the budget, the drift under way). The loop works
//!   from this copy while the tunnel is down.
//! - `watch_actions`: action id → [`ActionEntry`]: the journal of converging actions (create,
//!   power, delete), written and flushed before the action and again with its result, so an
//!   action is never started twice by a restart (one still running is resumed: each converges).
//! - `watch_events`: `at_ms ++ counter` → [`MachineEvent`]: events waiting for the broker's
//!   acknowledgement, oldest first.
//!
//! Nothing here is flushed; callers flush (group commit) before telling anyone.

use std::sync::atomic::{AtomicU64, Ordering};

use pcg_proto::machines::{Declaration, DesiredPower, Drift, MachineEvent};
use serde::{Deserialize, Serialize};

use super::{now_ms, Store, StoreError};

/// A declared machine as the gateway keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LocalMachine {
    pub id: String,
    /// The generation of `declaration` (the highest the SaaS sent).
    pub generation: u64,
    /// None once the declaration was deleted.
    pub declaration: Option<Declaration>,
    pub deleted: bool,
    /// The VM incarnation: its create carries the mark `<id>.<incarnation>` (extraConfig, Nova
    /// metadata), so an interrupted create is found; bumped when the VM is created again.
    pub incarnation: u32,
    /// The provider's id of the VM (or the BMC's system), once created, adopted or found.
    pub provider_id: Option<String>,
    /// Ids of earlier VMs of this machine (gone, created again), oldest first.
    pub previous_ids: Vec<String>,
    /// The last generation converged (created, adopted, powered as declared).
    pub converged_generation: u64,
    /// When heals were started (Unix ms), within the budget's window.
    pub heals: Vec<i64>,
    /// Healing stopped (the budget ran out) while the declaration has this generation.
    pub suspended_at: Option<u64>,
    /// The drift under way (empty: in sync or not judged yet).
    pub drift: Vec<Drift>,
    /// The last observation that was in sync (the `before` of a drift).
    pub in_sync: Option<serde_json::Value>,
    /// When the provider last showed it present.
    pub last_seen_ms: Option<i64>,
    /// What the last converging action failed with (cleared by one that succeeds).
    #[serde(default)]
    pub last_error: Option<String>,
    /// Converging actions failed in a row, and when the next may start (a failing create is
    /// retried with a growing pause, not on every cycle).
    #[serde(default)]
    pub failures: u32,
    #[serde(default)]
    pub retry_at_ms: Option<i64>,
}

impl LocalMachine {
    /// The mark a create of the current incarnation carries.
    pub fn mark(&self) -> String {
        format!("{}.{}", self.id, self.incarnation)
    }

    /// Heals within the last `window_seconds`.
    pub fn heals_within(&self, window_seconds: u64, now: i64) -> u32 {
        let since = now - i64::try_from(window_seconds.saturating_mul(1000)).unwrap_or(i64::MAX);
        u32::try_from(self.heals.iter().filter(|t| **t > since).count()).unwrap_or(u32::MAX)
    }

    pub fn suspended(&self) -> bool {
        self.suspended_at == Some(self.generation)
    }
}

/// A converging action.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "do")]
pub enum Action {
    /// Create the VM marked `mark` (or find the one a create with that mark made).
    Create {
        mark: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        previous_id: Option<String>,
    },
    /// Power the VM (or the bare-metal system) `provider_id` on or off.
    Power {
        to: DesiredPower,
        provider_id: String,
    },
    /// Delete the VM `provider_id`.
    Delete { provider_id: String },
}

impl Action {
    pub fn describe(&self) -> String {
        match self {
            Action::Create { mark, previous_id } => match previous_id {
                Some(p) => format!("create a new VM (mark {mark}) in place of {p}"),
                None => format!("create the VM (mark {mark})"),
            },
            Action::Power { to, provider_id } => format!("power {provider_id} {}", to.as_str()),
            Action::Delete { provider_id } => format!("delete {provider_id}"),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ActionState {
    Running,
    Done,
}

/// One converging action in the journal.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ActionEntry {
    /// `act_` + hex.
    pub id: String,
    pub machine_id: String,
    /// The declaration generation it converges to.
    pub generation: u64,
    pub action: Action,
    /// A heal (counted in the budget), rather than converging to a (new) declaration.
    pub heal: bool,
    pub state: ActionState,
    pub started_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<bool>,
    /// What came of it: the VM's id, or the error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
}

/// Orders events written within one millisecond.
static EVENT_COUNTER: AtomicU64 = AtomicU64::new(0);

fn corrupt(what: String, e: serde_json::Error) -> StoreError {
    StoreError::Corrupt {
        what,
        message: e.to_string(),
    }
}

impl Store {
    /// Stores a declaration the SaaS sent (or its deletion) unless a newer generation is held;
    /// a new generation also starts a new heal budget. Returns the generation now held.
    pub fn put_declared(
        &self,
        id: &str,
        generation: u64,
        declaration: Option<Declaration>,
    ) -> Result<u64, StoreError> {
        let mut held = generation;
        self.machines
            .fetch_and_update(id.as_bytes(), |old| {
                let mut m = match old.and_then(|o| serde_json::from_slice::<LocalMachine>(o).ok()) {
                    Some(m) if m.generation >= generation => {
                        held = m.generation;
                        return old.map(<[u8]>::to_vec);
                    }
                    Some(m) => m,
                    None => LocalMachine {
                        id: id.to_string(),
                        generation: 0,
                        declaration: None,
                        deleted: false,
                        incarnation: 1,
                        provider_id: None,
                        previous_ids: Vec::new(),
                        converged_generation: 0,
                        heals: Vec::new(),
                        suspended_at: None,
                        drift: Vec::new(),
                        in_sync: None,
                        last_seen_ms: None,
                        last_error: None,
                        failures: 0,
                        retry_at_ms: None,
                    },
                };
                held = generation;
                m.generation = generation;
                m.deleted = declaration.is_none();
                if let Some(d) = &declaration {
                    m.declaration = Some(d.clone());
                }
                m.heals.clear();
                m.suspended_at = None;
                m.failures = 0;
                m.retry_at_ms = None;
                Some(serde_json::to_vec(&m).expect("records serialise"))
            })
            .map_err(self.err())?;
        Ok(held)
    }

    /// Every declared machine.
    pub fn watch_machines(&self) -> Result<Vec<LocalMachine>, StoreError> {
        let mut out = Vec::new();
        for kv in self.machines.iter() {
            let (k, v) = kv.map_err(self.err())?;
            out.push(
                serde_json::from_slice(&v)
                    .map_err(|e| corrupt(format!("machine {}", String::from_utf8_lossy(&k)), e))?,
            );
        }
        Ok(out)
    }

    pub fn watch_machine(&self, id: &str) -> Result<Option<LocalMachine>, StoreError> {
        match self.machines.get(id.as_bytes()).map_err(self.err())? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| corrupt(format!("machine {id}"), e)),
        }
    }

    /// Changes what the loop keeps about a machine (never its declaration: the SaaS's copy
    /// may have moved on meanwhile). `None` when it is gone.
    pub fn update_watch_machine(
        &self,
        id: &str,
        f: impl Fn(&mut LocalMachine),
    ) -> Result<Option<LocalMachine>, StoreError> {
        let mut out = None;
        self.machines
            .fetch_and_update(id.as_bytes(), |old| {
                let mut m: LocalMachine = serde_json::from_slice(old?).ok()?;
                let (generation, declaration, deleted) =
                    (m.generation, m.declaration.clone(), m.deleted);
                f(&mut m);
                (m.generation, m.declaration, m.deleted) = (generation, declaration, deleted);
                let bytes = serde_json::to_vec(&m).expect("records serialise");
                out = Some(m);
                Some(bytes)
            })
            .map_err(self.err())?;
        Ok(out)
    }

    /// Forgets a machine (deleted, or no longer declared).
    pub fn forget_machine(&self, id: &str) -> Result<(), StoreError> {
        self.machines.remove(id.as_bytes()).map_err(self.err())?;
        Ok(())
    }

    /// Journals an action as running.
    pub fn begin_action(&self, a: &ActionEntry) -> Result<(), StoreError> {
        self.watch_actions
            .insert(
                a.id.as_bytes(),
                serde_json::to_vec(a).expect("entries serialise"),
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Records an action's result.
    pub fn finish_action(
        &self,
        id: &str,
        ok: bool,
        result: String,
    ) -> Result<Option<ActionEntry>, StoreError> {
        let mut out = None;
        self.watch_actions
            .fetch_and_update(id.as_bytes(), |old| {
                let mut a: ActionEntry = serde_json::from_slice(old?).ok()?;
                a.state = ActionState::Done;
                a.finished_ms = Some(now_ms());
                a.ok = Some(ok);
                a.result = Some(result.clone());
                let bytes = serde_json::to_vec(&a).expect("entries serialise");
                out = Some(a);
                Some(bytes)
            })
            .map_err(self.err())?;
        Ok(out)
    }

    pub fn action(&self, id: &str) -> Result<Option<ActionEntry>, StoreError> {
        match self.watch_actions.get(id.as_bytes()).map_err(self.err())? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| corrupt(format!("watch action {id}"), e)),
        }
    }

    /// Actions still running (after a restart: the ones to resume).
    pub fn running_actions(&self) -> Result<Vec<ActionEntry>, StoreError> {
        let mut out = Vec::new();
        for v in self.watch_actions.iter().values() {
            let v = v.map_err(self.err())?;
            if let Ok(a) = serde_json::from_slice::<ActionEntry>(&v) {
                if a.state == ActionState::Running {
                    out.push(a);
                }
            }
        }
        Ok(out)
    }

    /// Forgets actions that finished before `cutoff_ms`; returns how many.
    pub fn prune_actions(&self, cutoff_ms: i64) -> Result<usize, StoreError> {
        let mut n = 0;
        for kv in self.watch_actions.iter() {
            let (k, v) = kv.map_err(self.err())?;
            if let Ok(a) = serde_json::from_slice::<ActionEntry>(&v) {
                if a.finished_ms.is_some_and(|f| f < cutoff_ms) {
                    self.watch_actions.remove(k).map_err(self.err())?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Queues an event for the broker.
    pub fn push_watch_event(&self, ev: &MachineEvent) -> Result<(), StoreError> {
        let mut k = u64::try_from(ev.at_ms).unwrap_or(0).to_be_bytes().to_vec();
        k.extend_from_slice(&EVENT_COUNTER.fetch_add(1, Ordering::Relaxed).to_be_bytes());
        self.watch_events
            .insert(k, serde_json::to_vec(ev).expect("events serialise"))
            .map_err(self.err())?;
        Ok(())
    }

    /// Up to `limit` queued events, oldest first, with their keys.
    pub fn watch_events(&self, limit: usize) -> Result<Vec<(Vec<u8>, MachineEvent)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.watch_events.iter().take(limit) {
            let (k, v) = kv.map_err(self.err())?;
            match serde_json::from_slice(&v) {
                Ok(ev) => out.push((k.to_vec(), ev)),
                Err(e) => {
                    tracing::warn!("dropping an unreadable queued machine event: {e}");
                    self.watch_events.remove(k).map_err(self.err())?;
                }
            }
        }
        Ok(out)
    }

    /// Drops events the broker acknowledged.
    pub fn drop_watch_events(&self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        for k in keys {
            self.watch_events.remove(k).map_err(self.err())?;
        }
        Ok(())
    }

    pub fn watch_event_depth(&self) -> usize {
        self.watch_events.len()
    }

    /// Writes and flushes a probe record: whether the store takes durable writes.
    pub async fn probe_write(&self) -> Result<(), StoreError> {
        self.watch_actions
            .insert(b"\0probe", &now_ms().to_be_bytes())
            .map_err(self.err())?;
        self.flush().await?;
        self.watch_actions.remove(b"\0probe").map_err(self.err())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decl(power: &str) -> Declaration {
        serde_json::from_value(
            serde_json::json!({"name": "n", "bare_metal": {"bmc": "b"}, "power": power}),
        )
        .expect("declaration")
    }

    #[test]
    fn generations_only_move_forward_and_reset_the_heal_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(dir.path()).expect("open");
        assert_eq!(s.put_declared("m1", 2, Some(decl("on"))).expect("put"), 2);
        s.update_watch_machine("m1", |m| {
            m.heals = vec![now_ms()];
            m.suspended_at = Some(2);
            m.generation = 99; // the loop cannot change the declaration
        })
        .expect("update");
        let m = s.watch_machine("m1").expect("get").expect("known");
        assert_eq!(m.generation, 2);
        assert!(m.suspended());
        assert_eq!(m.heals_within(60, now_ms()), 1);
        // An older generation is ignored; the held one is answered.
        assert_eq!(s.put_declared("m1", 1, Some(decl("off"))).expect("put"), 2);
        assert_eq!(
            s.watch_machine("m1")
                .expect("get")
                .expect("known")
                .declaration,
            Some(decl("on"))
        );
        assert_eq!(s.put_declared("m1", 3, Some(decl("off"))).expect("put"), 3);
        let m = s.watch_machine("m1").expect("get").expect("known");
        assert!(!m.suspended() && m.heals.is_empty());
        assert_eq!(s.put_declared("m1", 4, None).expect("delete"), 4);
        let m = s.watch_machine("m1").expect("get").expect("known");
        assert!(m.deleted);
        assert_eq!(m.declaration, Some(decl("off")), "kept: what to delete");
        assert_eq!(m.mark(), "m1.1");
    }

    #[test]
    fn actions_journal_and_events_queue() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(dir.path()).expect("open");
        let a = ActionEntry {
            id: "act_1".into(),
            machine_id: "m1".into(),
            generation: 1,
            action: Action::Power {
                to: DesiredPower::On,
                provider_id: "vm-1".into(),
            },
            heal: true,
            state: ActionState::Running,
            started_ms: now_ms(),
            finished_ms: None,
            ok: None,
            result: None,
        };
        s.begin_action(&a).expect("begin");
        assert_eq!(s.running_actions().expect("running"), vec![a.clone()]);
        let done = s
            .finish_action("act_1", true, "on".into())
            .expect("finish")
            .expect("known");
        assert_eq!(done.state, ActionState::Done);
        assert!(s.running_actions().expect("running").is_empty());
        assert_eq!(s.prune_actions(now_ms() + 1).expect("prune"), 1);

        for i in 0..3 {
            s.push_watch_event(&MachineEvent {
                id: format!("mev_{i}"),
                machine_id: "m1".into(),
                kind: "machine.drift".into(),
                alert: false,
                message: String::new(),
                details: serde_json::Value::Null,
                at_ms: 5,
            })
            .expect("push");
        }
        let evs = s.watch_events(2).expect("events");
        assert_eq!(
            evs.iter().map(|(_, e)| e.id.as_str()).collect::<Vec<_>>(),
            vec!["mev_0", "mev_1"]
        );
        s.drop_watch_events(&evs.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>())
            .expect("drop");
        assert_eq!(s.watch_event_depth(), 1);
    }
}
