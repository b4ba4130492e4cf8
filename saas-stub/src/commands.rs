//! Command state in memory, with the store as its log.
//!
//! Every command without a result lives here (and recently finished ones, up to a bound), so a
//! lookup, a delivery or an acknowledgement touches memory, not the disk. The store is written
//! twice per command, each time durably before anything is acknowledged: the whole record at
//! submit, and the record with its result at completion. Deliveries and the gateway's
//! "received" are kept in memory only: after a restart a command without a result is simply
//! queued again, and redelivered when its gateway connects.
//!
//! At start the commands still pending in the store are loaded; finished ones are read from the
//! store when asked for and are not kept.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use crate::store::{now_ms, Command, CommandResult, CommandState, Store, StoreError};

/// Finished commands kept in memory for fast lookups (the newest).
const FINISHED_CACHE: usize = 10_000;

#[derive(Default)]
struct Inner {
    by_id: HashMap<String, Command>,
    /// Pending commands per gateway, in submission order (the store's sequence).
    pending: HashMap<String, BTreeMap<Vec<u8>, String>>,
    /// Finished commands in memory, oldest first, for the bound.
    finished: VecDeque<String>,
}

/// The command table.
#[derive(Default)]
pub struct Commands(Mutex<Inner>);

impl Commands {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().expect("commands lock is never poisoned")
    }

    /// Loads every command still pending in the store.
    pub fn load(store: &Store) -> Result<Commands, StoreError> {
        let me = Commands::default();
        {
            let mut inner = me.lock();
            for c in store.all_pending()? {
                inner
                    .pending
                    .entry(c.gateway_id.clone())
                    .or_default()
                    .insert(c.pending_key.clone(), c.id.clone());
                inner.by_id.insert(c.id.clone(), c);
            }
        }
        Ok(me)
    }

    /// Writes a new command to the store (not yet flushed) and to memory.
    pub fn insert(&self, store: &Store, cmd: &mut Command) -> Result<(), StoreError> {
        store.insert_command(cmd)?;
        let mut inner = self.lock();
        inner
            .pending
            .entry(cmd.gateway_id.clone())
            .or_default()
            .insert(cmd.pending_key.clone(), cmd.id.clone());
        inner.by_id.insert(cmd.id.clone(), cmd.clone());
        Ok(())
    }

    /// One command, from memory or else from the store.
    pub fn get(&self, store: &Store, id: &str) -> Result<Option<Command>, StoreError> {
        if let Some(c) = self.lock().by_id.get(id) {
            return Ok(Some(c.clone()));
        }
        store.command(id)
    }

    /// A command in memory, if it is there.
    pub fn cached(&self, id: &str) -> Option<Command> {
        self.lock().by_id.get(id).cloned()
    }

    /// Counts a delivery; returns the command as delivered (None when it is not pending).
    pub fn delivered(&self, id: &str) -> Option<Command> {
        let mut inner = self.lock();
        let c = inner.by_id.get_mut(id)?;
        if c.state.is_terminal() {
            return None;
        }
        c.deliveries += 1;
        if c.state == CommandState::Queued {
            c.state = CommandState::Delivered;
        }
        Some(c.clone())
    }

    /// The gateway journaled it.
    pub fn received(&self, id: &str, gateway_id: &str) {
        let mut inner = self.lock();
        if let Some(c) = inner.by_id.get_mut(id) {
            if c.gateway_id == gateway_id && !c.state.is_terminal() {
                c.state = CommandState::Received;
                c.received_ms.get_or_insert(now_ms());
            }
        }
    }

    /// Records a result (written to the store, not yet flushed). `Ok(None)`: not a command of
    /// this gateway; `Ok(Some(false))`: it already had one (a redelivered result).
    pub fn complete(
        &self,
        store: &Store,
        id: &str,
        gateway_id: &str,
        result: CommandResult,
    ) -> Result<Option<Option<Command>>, StoreError> {
        let current = self.get(store, id)?;
        let Some(mut c) = current else {
            return Ok(None);
        };
        if c.gateway_id != gateway_id {
            return Ok(None);
        }
        if c.state.is_terminal() {
            return Ok(Some(None));
        }
        c.state = if result.ok {
            CommandState::Succeeded
        } else {
            CommandState::Failed
        };
        c.completed_ms = Some(now_ms());
        c.result = Some(result);
        store.complete_command(&c)?;
        let mut inner = self.lock();
        if let Some(p) = inner.pending.get_mut(gateway_id) {
            p.remove(&c.pending_key);
            if p.is_empty() {
                inner.pending.remove(gateway_id);
            }
        }
        inner.by_id.insert(c.id.clone(), c.clone());
        inner.finished.push_back(c.id.clone());
        while inner.finished.len() > FINISHED_CACHE {
            if let Some(old) = inner.finished.pop_front() {
                inner.by_id.remove(&old);
            }
        }
        Ok(Some(Some(c)))
    }

    /// Commands of a gateway still waiting for a result, oldest first.
    pub fn pending(&self, gateway_id: &str) -> Vec<Command> {
        let inner = self.lock();
        inner
            .pending
            .get(gateway_id)
            .map(|p| {
                p.values()
                    .filter_map(|id| inner.by_id.get(id).cloned())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn pending_count(&self, gateway_id: &str) -> usize {
        self.lock().pending.get(gateway_id).map_or(0, BTreeMap::len)
    }

    /// Pending commands per gateway.
    pub fn pending_by_gateway(&self) -> Vec<(String, usize)> {
        self.lock()
            .pending
            .iter()
            .map(|(g, p)| (g.clone(), p.len()))
            .collect()
    }

    /// Forgets finished commands from memory (after retention removed them from the store).
    pub fn forget(&self, ids: &[String]) {
        let mut inner = self.lock();
        for id in ids {
            if inner.by_id.get(id).is_some_and(|c| c.state.is_terminal()) {
                inner.by_id.remove(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::CommandFilter;

    fn cmd(id: &str, tenant: &str, gw: &str, at: i64) -> Command {
        Command {
            id: id.into(),
            tenant_id: tenant.into(),
            gateway_id: gw.into(),
            kind: "gateway.echo".into(),
            payload: serde_json::json!({}),
            state: CommandState::Queued,
            submitted_ms: at,
            deliveries: 0,
            received_ms: None,
            completed_ms: None,
            result: None,
            pending_key: Vec::new(),
        }
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

    #[test]
    fn pending_survives_a_restart_and_retention_keeps_what_it_must() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let t = store.create_tenant("t").expect("tenant").id;
        let table = Commands::load(&store).expect("load");
        let day = 86_400_000;
        let now = now_ms();
        for (id, at) in [
            ("c_old_done", now - 10 * day),
            ("c_old_pending", now - 10 * day),
            ("c_new_done", now),
        ] {
            table
                .insert(&store, &mut cmd(id, &t, "gw_1", at))
                .expect("insert");
        }
        for id in ["c_old_done", "c_new_done"] {
            table
                .complete(&store, id, "gw_1", ok())
                .expect("complete")
                .expect("known")
                .expect("newly");
        }
        // A redelivered result is recognised; another gateway's is not its to give.
        assert!(matches!(
            table.complete(&store, "c_new_done", "gw_1", ok()),
            Ok(Some(None))
        ));
        assert!(matches!(
            table.complete(&store, "c_old_pending", "gw_2", ok()),
            Ok(None)
        ));
        assert_eq!(table.pending_count("gw_1"), 1);
        // A restart rebuilds the pending table from the store.
        let table = Commands::load(&store).expect("reload");
        assert_eq!(
            table
                .pending("gw_1")
                .iter()
                .map(|c| c.id.as_str())
                .collect::<Vec<_>>(),
            vec!["c_old_pending"]
        );
        // Retention deletes old finished commands only.
        let gone = store.prune_commands(now - 7 * day).expect("prune");
        assert_eq!(gone, vec!["c_old_done".to_string()]);
        assert!(store.command("c_old_done").expect("read").is_none());
        assert!(store.command("c_old_pending").expect("read").is_some());
        let ids: Vec<String> = store
            .tenant_command_ids(&t)
            .collect::<Result<_, _>>()
            .expect("ids");
        assert_eq!(
            ids,
            vec!["c_new_done".to_string(), "c_old_pending".to_string()]
        );
        let _ = CommandFilter::default();
    }

    #[test]
    fn events_are_listed_per_tenant_and_pruned_by_age() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        store
            .event(Some("t1"), None, "k", "one".into())
            .expect("event");
        store
            .event(Some("t2"), None, "k", "two".into())
            .expect("event");
        store
            .event(None, None, "k", "operator".into())
            .expect("event");
        let t1 = store.events(Some("t1"), None, None, 100).expect("list");
        assert_eq!(
            t1.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(),
            vec!["one"]
        );
        assert_eq!(store.events(None, None, None, 100).expect("all").len(), 3);
        assert_eq!(store.prune_events(now_ms() + 1).expect("prune"), 3);
        assert!(store
            .events(Some("t1"), None, None, 100)
            .expect("list")
            .is_empty());
    }
}
