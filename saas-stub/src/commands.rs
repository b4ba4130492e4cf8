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
    /// A command without a result, in memory: in its gateway's queue and, with a deadline, in
    /// the deadlines.
    fn queue(&mut self, c: Command) {
        self.pending
            .entry(c.gateway_id.clone())
            .or_default()
            .insert(c.pending_key.clone(), c.id.clone());
        if let Some(d) = c.deadline_ms {
            self.deadlines.insert((d, c.id.clone()));
        }
        self.by_id.insert(c.id.clone(), c);
    }

    /// Ends a command in memory: out of the pending queue, into the finished bound.
    fn finish(&mut self, c: Command) {
        self.ended(&c);
        self.by_id.insert(c.id.clone(), c);
    }

    /// [`Inner::finish`] for a command already ended in `by_id`: takes it out of the pending
    /// queue and the deadlines, and counts it in the finished bound.
    fn ended(&mut self, c: &Command) {
        if let Some(p) = self.pending.get_mut(&c.gateway_id) {
            p.remove(&c.pending_key);
            if p.is_empty() {
                self.pending.remove(&c.gateway_id);
            }
        }
        if let Some(d) = c.deadline_ms {
            self.deadlines.remove(&(d, c.id.clone()));
        }
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

    /// Loads every command still pending in the store. One node records no deliveries, so
    /// each may have reached its gateway before the restart; a replica's store has every
    /// delivery the cluster's log recorded (`deliveries_recorded`).
    pub fn load(store: &Store, deliveries_recorded: bool) -> Result<Commands, StoreError> {
        let me = Commands::default();
        {
            let mut inner = me.lock();
            for mut c in store.all_pending()? {
                c.handed_out = !deliveries_recorded || c.state != CommandState::Queued;
                inner.queue(c);
            }
        }
        Ok(me)
    }

    /// A new command in memory, once its operation was applied (again: nothing changes).
    pub fn insert(&self, cmd: &Command) {
        let mut inner = self.lock();
        if inner.by_id.contains_key(&cmd.id) {
            return;
        }
        inner.queue(cmd.clone());
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

    /// Takes back an end [`Commands::end_undelivered`] decided whose operation could not be
    /// written: the command is queued again, in its place in its gateway's queue (nothing
    /// handed it out meanwhile: an ended command is not delivered). Returns it as queued, for
    /// its tunnel.
    pub fn reopen_undelivered(&self, store: &Store, id: &str) -> Option<Command> {
        let mut inner = self.lock();
        let mut c = match inner.by_id.remove(id) {
            Some(c) => c,
            // Out of memory already (as many ends since): the store has it as it was.
            None => match store.command(id) {
                Ok(Some(c)) => c,
                Ok(None) => return None,
                Err(e) => {
                    tracing::error!(command = %id, "cannot read a command back to take its end back: {e}");
                    return None;
                }
            },
        };
        c.state = CommandState::Queued;
        c.result = None;
        c.completed_ms = None;
        if let Some(at) = inner.finished.iter().rposition(|f| *f == c.id) {
            inner.finished.remove(at);
        }
        inner.queue(c.clone());
        Some(c)
    }

    /// Where a result of `gateway_id` for command `id` stands: `None`, not a command of this
    /// gateway; `Some(None)`, it has ended (a redelivered result); `Some(Some(c))`, it waits for
    /// this result.
    pub fn to_complete(
        &self,
        store: &Store,
        id: &str,
        gateway_id: &str,
    ) -> Result<Option<Option<Command>>, StoreError> {
        let Some(c) = self.get(store, id)? else {
            return Ok(None);
        };
        if c.gateway_id != gateway_id {
            return Ok(None);
        }
        Ok(Some((!c.state.is_terminal()).then_some(c)))
    }

    /// A command ended (its operation applied): out of the pending queue, into the finished
    /// bound. Again, or for a command not in memory: nothing changes but the record.
    pub fn finish(&self, c: &Command) {
        let mut inner = self.lock();
        let known = inner.by_id.get(&c.id).map(|m| m.state.is_terminal());
        if known == Some(true) {
            return;
        }
        let mut c = c.clone();
        if let Some(m) = inner.by_id.get(&c.id) {
            // Memory knows what the record does not: the latest progress, whether handed out.
            c.progress = m.progress.clone();
            c.handed_out = m.handed_out;
        }
        inner.finish(c);
    }

    /// Records in memory that a command was handed to a tunnel (a replica learned it from the
    /// log).
    pub fn handed_out(&self, id: &str) {
        let mut inner = self.lock();
        if let Some(c) = inner.by_id.get_mut(id) {
            c.handed_out = true;
            if c.state == CommandState::Queued {
                c.state = CommandState::Delivered;
            }
        }
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

    /// Ends, in memory, a command that was never handed to a tunnel (its operation is for the
    /// caller to write); None when it ended already or may have reached its gateway. Decided
    /// under the lock a delivery takes, so it is either delivered or ended here, never both.
    pub fn end_undelivered(&self, id: &str, result: CommandResult) -> Option<Command> {
        let mut inner = self.lock();
        let c = inner.by_id.get_mut(id)?;
        if c.state.is_terminal() || c.handed_out {
            return None;
        }
        c.state = CommandState::of_result(&result);
        c.completed_ms = Some(now_ms());
        c.result = Some(result);
        let c = c.clone();
        inner.ended(&c);
        Some(c)
    }

    /// Records a cancel asked for a command that has not ended (the first reason stands):
    /// `Forwarded` with the command, or `Finished`/`Unknown`. Memory only; the caller writes
    /// the operation.
    pub fn ask_cancel(
        &self,
        store: &Store,
        id: &str,
        cancel: CancelRequest,
    ) -> Result<CancelOutcome, StoreError> {
        {
            let mut inner = self.lock();
            match inner.by_id.get_mut(id) {
                Some(c) if !c.state.is_terminal() => {
                    c.cancel.get_or_insert(cancel);
                    return Ok(CancelOutcome::Forwarded(c.clone()));
                }
                Some(c) => return Ok(CancelOutcome::Finished(c.clone())),
                None => {}
            }
        }
        // Ended and dropped from memory meanwhile.
        Ok(match store.command(id)? {
            Some(c) => CancelOutcome::Finished(c),
            None => CancelOutcome::Unknown,
        })
    }

    /// Records in memory a cancel a replica learned from the log.
    pub fn set_cancel(&self, id: &str, cancel: &CancelRequest) {
        if let Some(c) = self.lock().by_id.get_mut(id) {
            if !c.state.is_terminal() {
                c.cancel.get_or_insert_with(|| cancel.clone());
            }
        }
    }

    /// The commands whose deadline is at or before `now`, taken off the deadline list.
    pub fn due(&self, now: i64) -> Vec<String> {
        let mut inner = self.lock();
        let mut due = Vec::new();
        while let Some(first) = inner.deadlines.first().cloned() {
            if first.0 > now {
                break;
            }
            inner.deadlines.remove(&first);
            due.push(first.1);
        }
        due
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
    use serde_json::json;

    fn result(ok: bool) -> CommandResult {
        CommandResult {
            ok,
            output: serde_json::Value::Null,
            error_class: if ok { String::new() } else { "failed".into() },
            error_message: String::new(),
            started_ms: 1,
            finished_ms: 2,
        }
    }

    /// An end decided in memory for a command never handed out, taken back (its operation
    /// could not be written), leaves the command queued in its place with its deadline, as it
    /// was: delivered next, not shown ended.
    #[test]
    fn an_undelivered_end_taken_back_leaves_the_command_queued_as_it_was() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let commands = Commands::default();
        for (i, id) in ["c_1", "c_2"].into_iter().enumerate() {
            let mut c = Command::queued(id.into(), "tn_1", "gw_1", "k".into(), json!({}), 1);
            c.pending_key = Store::pending_key("gw_1", i as u64);
            c.deadline_ms = Some(1_000);
            commands.insert(&c);
        }
        let ids = |v: Vec<Command>| v.into_iter().map(|c| c.id).collect::<Vec<_>>();
        let ended = commands
            .end_undelivered("c_1", result(false))
            .expect("never handed out");
        assert_eq!(ended.state, CommandState::Failed);
        assert!(commands.end_undelivered("c_1", result(false)).is_none());
        assert!(commands.delivered("c_1").is_none());
        assert_eq!(ids(commands.pending("gw_1")), vec!["c_2"]);

        let queued = commands
            .reopen_undelivered(&store, "c_1")
            .expect("queued again, for its tunnel");
        assert_eq!(queued.id, "c_1");
        assert_eq!(queued.state, CommandState::Queued);
        assert_eq!(ids(commands.pending("gw_1")), vec!["c_1", "c_2"]);
        let back = commands.cached("c_1").expect("in memory");
        assert_eq!(back.state, CommandState::Queued);
        assert!(back.result.is_none() && back.completed_ms.is_none());
        assert_eq!(commands.due(1_000), vec!["c_1", "c_2"]);
        assert_eq!(commands.lock().finished.len(), 0);
        assert_eq!(
            commands.delivered("c_1").expect("delivered now").state,
            CommandState::Delivered
        );
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
