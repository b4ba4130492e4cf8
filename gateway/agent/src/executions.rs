//! Executions under way: how each one is stopped (cancelled by the SaaS, past its deadline, or
//! interrupted by a stopping gateway) and how its progress reaches the SaaS.
//!
//! Every execution has a [`CancellationToken`] (handed to its handler in
//! [`ExecContext`](crate::executor::ExecContext)) and the reason it was stopped, if it was: the
//! first reason wins. Progress a handler reports is forwarded as `CommandProgress` frames at most
//! once per [`PROGRESS_EVERY`] per command, the latest report winning; progress is not stored and
//! is not sent once the execution has ended.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pcg_proto::v1::gateway_frame::Kind as GKind;
use pcg_proto::v1::{CommandProgress, GatewayFrame};
use pcg_provider::TaskProgress;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::store::now_ms;
use crate::Gateway;

/// At most one progress frame per command this often.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Longest progress message sent (characters).
const MAX_PROGRESS_MESSAGE: usize = 512;

/// Why an execution was stopped before its handler ended by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The SaaS asked (`POST /v1/commands/{id}/cancel`); the reason it gave.
    Cancelled(String),
    /// The command's deadline (Unix ms) passed.
    TimedOut { deadline_ms: i64 },
    /// The gateway was stopping; why.
    Interrupted(String),
}

impl Stop {
    /// The error class of a command stopped this way.
    pub fn class(&self) -> &'static str {
        match self {
            Stop::Cancelled(_) => "cancelled",
            Stop::TimedOut { .. } => "timed_out",
            Stop::Interrupted(_) => "interrupted",
        }
    }

    /// What happened, for a person.
    pub fn message(&self) -> String {
        match self {
            Stop::Cancelled(reason) => format!("cancelled: {reason}"),
            Stop::TimedOut { deadline_ms } => format!(
                "timed out: its deadline ({}) passed",
                crate::status::rfc3339(*deadline_ms)
            ),
            Stop::Interrupted(reason) => format!("interrupted: {reason}"),
        }
    }
}

/// One execution under way.
pub struct Execution {
    /// Fired when the execution is to stop; handlers that can stop part-way watch it.
    pub cancel: CancellationToken,
    stop: Mutex<Option<Stop>>,
    /// The latest progress report, for the forwarder (started on the first report).
    progress: Mutex<Option<watch::Sender<Option<TaskProgress>>>>,
}

impl Execution {
    fn new() -> Self {
        Execution {
            cancel: CancellationToken::new(),
            stop: Mutex::new(None),
            progress: Mutex::new(None),
        }
    }

    /// Stops the execution for `why`, unless it was stopped already (the first reason wins).
    /// Returns whether this call stopped it.
    pub fn stop(&self, why: Stop) -> bool {
        let mut s = self.stop.lock().expect("stop lock is never poisoned");
        if s.is_some() {
            return false;
        }
        tracing::info!("stopping an execution: {}", why.message());
        *s = Some(why);
        drop(s);
        self.cancel.cancel();
        true
    }

    /// Why it was stopped, if it was.
    pub fn stopped(&self) -> Option<Stop> {
        self.stop
            .lock()
            .expect("stop lock is never poisoned")
            .clone()
    }
}

/// The executions under way, by command id.
#[derive(Default)]
pub struct Executions(Mutex<HashMap<String, Arc<Execution>>>);

impl Executions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Execution>>> {
        self.0.lock().expect("executions lock is never poisoned")
    }

    /// Registers an execution of `id`; None when one is under way already.
    pub fn begin(&self, id: &str) -> Option<Arc<Execution>> {
        let mut m = self.lock();
        if m.contains_key(id) {
            return None;
        }
        let e = Arc::new(Execution::new());
        m.insert(id.to_string(), e.clone());
        Some(e)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Execution>> {
        self.lock().get(id).cloned()
    }

    /// The execution of `id` ended (its progress forwarder stops with it).
    pub fn end(&self, id: &str) {
        self.lock().remove(id);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops every execution under way for `why`; returns how many this stopped.
    pub fn stop_all(&self, why: &Stop) -> usize {
        let all: Vec<Arc<Execution>> = self.lock().values().cloned().collect();
        all.iter().filter(|e| e.stop(why.clone())).count()
    }
}

/// Reports progress of the execution of `id`: the latest report is sent as a `CommandProgress`
/// frame, at most one per [`PROGRESS_EVERY`], while the execution is under way and a tunnel is
/// up (never waiting on it; a report that finds no room is superseded by the next).
pub fn report(gw: &Arc<Gateway>, id: &str, exec: &Execution, p: &TaskProgress) {
    let mut slot = exec
        .progress
        .lock()
        .expect("progress lock is never poisoned");
    match slot.as_ref() {
        Some(tx) => {
            tx.send_replace(Some(p.clone()));
        }
        None => {
            let (tx, rx) = watch::channel(Some(p.clone()));
            *slot = Some(tx);
            gw.exec_tasks
                .spawn(forward(gw.clone(), id.to_string(), rx, exec.cancel.clone()));
        }
    }
}

/// Sends the latest report, then waits [`PROGRESS_EVERY`] before the next; ends with the
/// execution.
async fn forward(
    gw: Arc<Gateway>,
    id: String,
    mut rx: watch::Receiver<Option<TaskProgress>>,
    stopped: CancellationToken,
) {
    // The first report is already in the channel: mark it unseen.
    rx.mark_changed();
    loop {
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            // A stopped execution reports nothing more: its result says how it ended.
            _ = stopped.cancelled() => return,
        }
        let p = rx.borrow_and_update().clone();
        // Ended meanwhile (the entry is removed before the result is sent): nothing after it.
        if gw.executions.get(&id).is_none() {
            return;
        }
        if let (Some(p), Some(tx)) = (p, gw.outbound()) {
            let _ = tx.try_send(progress_frame(&id, &p));
        }
        tokio::select! {
            _ = tokio::time::sleep(PROGRESS_EVERY) => {}
            _ = stopped.cancelled() => return,
        }
    }
}

fn progress_frame(id: &str, p: &TaskProgress) -> GatewayFrame {
    GatewayFrame {
        kind: Some(GKind::Progress(CommandProgress {
            command_id: id.to_string(),
            percent: p.percent.map(|v| u32::from(v.min(100))),
            message: p.message.chars().take(MAX_PROGRESS_MESSAGE).collect(),
            at_unix_ms: now_ms(),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_stop_wins_and_fires_the_token() {
        let ex = Executions::default();
        let e = ex.begin("c1").expect("new");
        assert!(ex.begin("c1").is_none(), "one execution per id");
        assert!(!e.cancel.is_cancelled());
        assert!(e.stop(Stop::TimedOut { deadline_ms: 0 }));
        assert!(!e.stop(Stop::Cancelled("late".into())));
        assert!(e.cancel.is_cancelled());
        assert_eq!(e.stopped().map(|s| s.class()), Some("timed_out"));
        let f = ex.begin("c2").expect("new");
        assert_eq!(ex.stop_all(&Stop::Interrupted("stopping".into())), 1);
        assert_eq!(f.stopped().map(|s| s.class()), Some("interrupted"));
        ex.end("c1");
        ex.end("c2");
        assert!(ex.is_empty());
    }
}
