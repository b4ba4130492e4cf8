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
//!
//! Progress reports are kept in memory only (the latest per command). A cancel asked for is
//! written to the command's record (so it is sent again after a restart) unless the command was
//! never handed to a tunnel, in which case it ends `cancelled` at once. The same holds for a
//! deadline: a command never handed out ends `timed_out` here when it passes; one that may have
//! reached its gateway is ended by the gateway, which knows the deadline too.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;

use crate::store::{
    now_ms, CancelRequest, Command, CommandResult, CommandState, Progress, Store, StoreError,
};

/// Finished commands kept in memory for fast lookups (the newest).
const FINISHED_CACHE: usize = 10_000;

#[derive(Default)]
struct Inner {
    by_id: HashMap<String, Command>,
    /// Pending commands per gateway, in submission order (the store's sequence).
    pending: HashMap<String, BTreeMap<Vec<u8>, String>>,
    /// Finished commands in memory, oldest first, for the bound.
    finished: VecDeque<String>,
    /// Deadlines of unfinished commands: (deadline ms, id).
    deadlines: BTreeSet<(i64, String)>,
}

impl Inner {
    /// Ends a command in memory: out of the pending queue, into the finished bound.
    fn finish(&mut self, c: &Command) {
        if let Some(p) = self.pending.get_mut(&c.gateway_id) {
            p.remove(&c.pending_key);
            if p.is_empty() {
                self.pending.remove(&c.gateway_id);
            }
        }
        if let Some(d) = c.deadline_ms {
            self.deadlines.remove(&(d, c.id.clone()));
        }
        self.by_id.insert(c.id.clone(), c.clone());
        self.finished.push_back(c.id.clone());
        while self.finished.len() > FINISHED_CACHE {
            if let Some(old) = self.finished.pop_front() {
                self.by_id.remove(&old);
            }
        }
    }
}

/// What a cancel did.
#[derive(Debug)]
pub enum CancelOutcome {
    /// No such command.
    Unknown,
    /// It had ended already; its result stands.
    Finished(Command),
    /// It had never been handed to a tunnel: it ended `cancelled` now (written, not flushed).
    CancelledNow(Command),
    /// It may have reached its gateway: the cancel is recorded (written, not flushed) and is
    /// for the gateway to carry out.
    Forwarded(Command),
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
            for mut c in store.all_pending()? {
                // Deliveries before the restart are not recorded: it may have reached its
                // gateway.
                c.handed_out = true;
                inner
                    .pending
                    .entry(c.gateway_id.clone())
                    .or_default()
                    .insert(c.pending_key.clone(), c.id.clone());
                if let Some(d) = c.deadline_ms {
                    inner.deadlines.insert((d, c.id.clone()));
                }
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
        if let Some(d) = cmd.deadline_ms {
            inner.deadlines.insert((d, cmd.id.clone()));
        }
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
        c.handed_out = true;
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
        c.state = CommandState::of_result(&result);
        c.completed_ms = Some(now_ms());
        c.result = Some(result);
        store.complete_command(&c)?;
        self.lock().finish(&c);
        Ok(Some(Some(c)))
    }

    /// Records the latest progress of a command of `gateway_id` that has not ended.
    pub fn progress(&self, id: &str, gateway_id: &str, p: Progress) {
        let mut inner = self.lock();
        if let Some(c) = inner.by_id.get_mut(id) {
            if c.gateway_id == gateway_id && !c.state.is_terminal() {
                c.progress = Some(p);
            }
        }
    }

    /// Ends a command that was never handed to a tunnel, here (written, not flushed); None when
    /// it ended already or may have reached its gateway. Decided under the lock a delivery
    /// takes, so it is either delivered or ended here, never both.
    fn end_undelivered(
        &self,
        store: &Store,
        id: &str,
        result: CommandResult,
    ) -> Result<Option<Command>, StoreError> {
        let c = {
            let mut inner = self.lock();
            let Some(c) = inner.by_id.get_mut(id) else {
                return Ok(None);
            };
            if c.state.is_terminal() || c.handed_out {
                return Ok(None);
            }
            c.state = CommandState::of_result(&result);
            c.completed_ms = Some(now_ms());
            c.result = Some(result);
            let c = c.clone();
            inner.finish(&c);
            c
        };
        store.complete_command(&c)?;
        Ok(Some(c))
    }

    /// A cancel for command `id` of `tenant_id` (see [`CancelOutcome`]).
    pub fn cancel(
        &self,
        store: &Store,
        id: &str,
        tenant_id: &str,
        reason: &str,
    ) -> Result<CancelOutcome, StoreError> {
        let Some(c) = self.get(store, id)?.filter(|c| c.tenant_id == tenant_id) else {
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
        if let Some(done) = self.end_undelivered(store, id, result)? {
            return Ok(CancelOutcome::CancelledNow(done));
        }
        let asked = {
            let mut inner = self.lock();
            match inner.by_id.get_mut(id) {
                Some(c) if !c.state.is_terminal() => {
                    c.cancel.get_or_insert(CancelRequest {
                        reason: reason.to_string(),
                        requested_ms: now,
                    });
                    Some(c.clone())
                }
                Some(c) => return Ok(CancelOutcome::Finished(c.clone())),
                None => None,
            }
        };
        match asked {
            Some(c) => {
                if let Some(cancel) = &c.cancel {
                    store.ask_cancel(&c.id, cancel)?;
                }
                Ok(CancelOutcome::Forwarded(c))
            }
            // Ended and dropped from memory meanwhile.
            None => Ok(match self.get(store, id)? {
                Some(c) => CancelOutcome::Finished(c),
                None => CancelOutcome::Unknown,
            }),
        }
    }

    /// Ends, as `timed_out`, every command past its deadline that was never handed to a tunnel
    /// (written, not flushed); the others are their gateways' to end. Returns those it ended.
    pub fn expire(&self, store: &Store, now: i64) -> Result<Vec<Command>, StoreError> {
        let due: Vec<(i64, String)> = {
            let mut inner = self.lock();
            let mut due = Vec::new();
            while let Some(first) = inner.deadlines.first().cloned() {
                if first.0 > now {
                    break;
                }
                inner.deadlines.remove(&first);
                due.push(first);
            }
            due
        };
        let mut ended = Vec::new();
        for (_, id) in due {
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
            if let Some(c) = self.end_undelivered(store, &id, result)? {
                ended.push(c);
            }
        }
        Ok(ended)
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
            deadline_ms: None,
            cancel: None,
            progress: None,
            handed_out: false,
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
    fn cancel_and_deadline_end_only_what_never_reached_a_gateway() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let t = store.create_tenant("t").expect("tenant").id;
        let table = Commands::load(&store).expect("load");
        let now = now_ms();
        for id in ["c_queued", "c_handed", "c_late", "c_sent_late", "c_done"] {
            let mut c = cmd(id, &t, "gw_1", now);
            if id.contains("late") {
                c.deadline_ms = Some(now - 1);
            }
            table.insert(&store, &mut c).expect("insert");
        }
        for id in ["c_handed", "c_sent_late"] {
            table.delivered(id).expect("pending");
        }
        table
            .complete(&store, "c_done", "gw_1", ok())
            .expect("complete");

        // Never handed out: ended here. Handed out: left to the gateway, the cancel recorded.
        match table.cancel(&store, "c_queued", &t, "r1").expect("cancel") {
            CancelOutcome::CancelledNow(c) => {
                assert_eq!(c.state, CommandState::Cancelled);
                assert!(c.result.expect("result").error_message.contains("r1"));
            }
            o => panic!("{o:?}"),
        }
        match table.cancel(&store, "c_handed", &t, "r2").expect("cancel") {
            CancelOutcome::Forwarded(c) => {
                assert_eq!(c.state, CommandState::Delivered);
                assert_eq!(c.cancel.expect("asked").reason, "r2");
            }
            o => panic!("{o:?}"),
        }
        // Asked again: the first reason stays.
        match table.cancel(&store, "c_handed", &t, "r3").expect("cancel") {
            CancelOutcome::Forwarded(c) => assert_eq!(c.cancel.expect("asked").reason, "r2"),
            o => panic!("{o:?}"),
        }
        assert!(matches!(
            table.cancel(&store, "c_done", &t, "r").expect("cancel"),
            CancelOutcome::Finished(_)
        ));
        assert!(matches!(
            table
                .cancel(&store, "c_handed", "other-tenant", "r")
                .expect("cancel"),
            CancelOutcome::Unknown
        ));

        // Deadlines: only the one never handed out ends here.
        let ended = table.expire(&store, now_ms()).expect("expire");
        assert_eq!(
            ended.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            vec!["c_late"]
        );
        assert_eq!(ended[0].state, CommandState::TimedOut);
        assert!(!table
            .cached("c_sent_late")
            .expect("kept")
            .state
            .is_terminal());

        // The recorded cancel survives a restart; everything pending counts as handed out.
        let table = Commands::load(&store).expect("reload");
        let pending = table.pending("gw_1");
        let handed = pending
            .iter()
            .find(|c| c.id == "c_handed")
            .expect("pending");
        assert_eq!(handed.cancel.as_ref().expect("kept").reason, "r2");
        assert!(matches!(
            table
                .cancel(&store, "c_sent_late", &t, "r")
                .expect("cancel"),
            CancelOutcome::Forwarded(_)
        ));
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
