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
            if inner
                .by_id
                .get(id)
                .is_some_and(|c| c.state.is_terminal())
            {
                inner.by_id.remove(id);
            }
        }
    }
}
