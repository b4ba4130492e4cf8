//! Where the application's changes go ([`Log`]): into the store at once (one node), or through
//! the cluster's operation log (replicas: [`crate::oplog`]), which every replica applies to its
//! own store in one order.
//!
//! A replica writes an operation by appending it to the stream (the stream's quorum holds it
//! from then on) and then waits until its own follower has applied it, so that what a request
//! reads after its write is what it wrote, and the outcome it acts on (a token redeemed, an
//! idempotency key claimed, a command ended first) is the one every replica computes. The
//! follower is one task: it applies every operation in the stream's order, records how far it
//! got (so a restarted replica resumes there; an operation applied twice leaves the same state),
//! and updates what this replica keeps in memory (pending commands, cancels asked). For an
//! operation another replica wrote it also does what the writer does for its own: hands a new
//! command or a cancel to the gateway's tunnel when that tunnel is here, and closes the tunnel of
//! a revoked gateway.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use super::{App, AppError, AppResult, Kind};
use crate::cluster::{ClusterConfig, ClusterError};
use crate::oplog::OpLog;
use crate::store::{Committed, Op, Outcome, Store};

/// Where changes go.
pub enum Log {
    /// One node: the store is the log.
    Local,
    /// A replica of a cluster.
    Cluster(Box<Replica>),
}

/// An operation as the stream carries it: who wrote it (the id of one append) and what.
#[derive(Serialize, Deserialize)]
struct Envelope {
    id: String,
    op: Op,
}

/// A replica's side of the cluster's log.
pub struct Replica {
    /// This replica's name (in the ids of its operations).
    pub name: String,
    log: OpLog,
    /// Operations this replica appended and waits to see applied, by envelope id.
    waiting: Mutex<HashMap<String, oneshot::Sender<Committed>>>,
    /// The last operation applied here.
    applied: watch::Sender<u64>,
    /// Bound on one write's wait (append and application).
    timeout: Duration,
}

/// How long a starting replica waits for the cluster's quorum.
pub const OPEN_WITHIN: Duration = Duration::from_secs(60);

/// How long the cluster's log may pause before what was applied is flushed, and how long it
/// may go unflushed while operations keep coming.
const FLUSH_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);
const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl Replica {
    /// Connects and opens the cluster's log. While JetStream has no quorum (a node restarting,
    /// a leader being elected) it tries again, for up to [`OPEN_WITHIN`].
    pub async fn open(cfg: &ClusterConfig, name: &str) -> Result<Replica, ClusterError> {
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(250);
        let log = loop {
            match OpLog::open(cfg, name).await {
                Ok(log) => break log,
                Err(e @ ClusterError::NoQuorum { .. })
                    if started.elapsed() + pause < OPEN_WITHIN =>
                {
                    tracing::warn!("the cluster's log cannot be opened yet: {e}; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        };
        Ok(Replica {
            name: name.to_string(),
            log,
            waiting: Mutex::new(HashMap::new()),
            applied: watch::channel(0).0,
            timeout: Duration::from_millis(cfg.request_timeout_ms.max(1)),
        })
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Committed>>> {
        self.waiting.lock().expect("waiting lock is never poisoned")
    }

    /// Appends `op` and waits until it is applied here; its number and outcome.
    async fn commit(&self, op: Op) -> AppResult<Committed> {
        let id = format!("{}.{}", self.name, hex::encode(rand::random::<[u8; 12]>()));
        let name = op.name();
        let payload =
            serde_json::to_vec(&Envelope { id: id.clone(), op }).expect("operations serialise");
        let (tx, rx) = oneshot::channel();
        self.waiting().insert(id.clone(), tx);
        if let Err(e) = self.log.append(&id, payload.into()).await {
            self.waiting().remove(&id);
            return Err(cluster_error(e));
        }
        match tokio::time::timeout(self.timeout.saturating_mul(4), rx).await {
            Ok(Ok(c)) => Ok(c),
            _ => {
                self.waiting().remove(&id);
                Err(AppError::new(
                    Kind::Unavailable,
                    "cluster_lagging",
                    format!(
                        "the cluster stored the change ({name}) but this replica has not applied it within {:?}: it is behind the cluster's log; retry, and check this replica's log and its connection to NATS",
                        self.timeout.saturating_mul(4)
                    ),
                ))
            }
        }
    }

    /// The last operation applied here.
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Waits until this replica has applied everything the cluster's log holds now.
    async fn barrier(&self) -> AppResult<()> {
        let last = self.log.last_seq().await.map_err(cluster_error)?;
        let mut rx = self.applied.subscribe();
        let bound = self.timeout.saturating_mul(4);
        let reached = tokio::time::timeout(bound, rx.wait_for(|a| *a >= last))
            .await
            .is_ok_and(|r| r.is_ok());
        match reached {
            true => Ok(()),
            false => Err(AppError::new(
                Kind::Unavailable,
                "cluster_lagging",
                format!("this replica has not applied the cluster's log up to {last} within {bound:?}: it is behind; retry, and check this replica's log and its connection to NATS"),
            )),
        }
    }
}

/// A cluster error as the API says it: no quorum is "unavailable, retry later".
pub fn cluster_error(e: ClusterError) -> AppError {
    match e {
        ClusterError::NoQuorum { .. } | ClusterError::Connect { .. } => {
            AppError::new(Kind::Unavailable, "no_quorum", e.to_string())
        }
        other => AppError::new(Kind::Internal, "cluster", other.to_string()),
    }
}

impl Log {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Log::Cluster(_))
    }

    pub fn replica(&self) -> Option<&Replica> {
        match self {
            Log::Cluster(r) => Some(r),
            Log::Local => None,
        }
    }
}

impl App {
    /// Makes a change. One node: applied to the store now (written, not flushed: the caller
    /// flushes before it tells anyone, as for any write). A replica: stored by the cluster's
    /// quorum and applied here before this returns.
    pub async fn commit(&self, op: Op) -> AppResult<Committed> {
        match &self.log {
            Log::Local => Ok(self.store.commit(&op)?),
            Log::Cluster(r) => r.commit(op).await,
        }
    }

    /// A replica: waits until it has applied everything the cluster's log holds now, so that
    /// what another replica acknowledged is seen here. Called before answering "not found" or
    /// "unknown" for something that may have just been made elsewhere. One node: nothing.
    pub async fn catch_up(&self) -> AppResult<()> {
        match &self.log {
            Log::Local => Ok(()),
            Log::Cluster(r) => r.barrier().await,
        }
    }

    /// [`App::authenticate`], and in a replica again after catching up when the key is not
    /// known (it may have just been made on another replica).
    /// Only a well-formed key whose id this replica does not know makes it catch up: a wrong
    /// secret or a revoked key costs the cluster nothing.
    pub async fn authenticate_fresh(&self, header: Option<&str>) -> AppResult<super::Caller> {
        let unknown_here = || {
            let id = header
                .and_then(|h| h.trim().split_once(' '))
                .and_then(|(_, k)| k.trim().strip_prefix("pcgk_"))
                .and_then(|k| k.split_once('.'))
                .map(|(id, _)| id)
                .filter(|id| super::plausible_id(id));
            id.is_some_and(|id| matches!(self.store.api_key(id), Ok(None)))
        };
        match self.authenticate(header) {
            Err(e)
                if self.log.is_cluster() && e.kind == Kind::Unauthenticated && unknown_here() =>
            {
                self.catch_up().await?;
                self.authenticate(header).map_err(|_| e)
            }
            r => r,
        }
    }

    /// Records an event (written, not flushed, on one node).
    pub async fn event(
        &self,
        tenant_id: Option<&str>,
        gateway_id: Option<&str>,
        kind: &str,
        message: String,
    ) -> AppResult<()> {
        let event = crate::store::ops::event_of(
            tenant_id,
            gateway_id,
            kind,
            message,
            crate::store::now_ms(),
        );
        self.commit(Op::Event { event }).await.map(|_| ())
    }

    /// Refuses what a replica cannot do yet: `what` is kept by each replica on its own.
    pub fn single_node_only(&self, what: &str) -> AppResult<()> {
        if self.log.is_cluster() {
            return Err(AppError::new(
                Kind::Unavailable,
                "not_in_cluster_mode",
                format!("{what} are not shared between replicas in this version of pcg-saas, so replicas refuse them; use a single pcg-saas (no [cluster] section) for them"),
            ));
        }
        Ok(())
    }
}

/// Applies the cluster's log to this replica, for ever (until the service stops): from the last
/// operation recorded as applied. Resolves `caught_up` once everything the stream held when it
/// started is applied.
pub async fn follow(app: Arc<App>, caught_up: oneshot::Sender<Result<u64, ClusterError>>) {
    let Some(replica) = app.log.replica() else {
        return;
    };
    let from = app.store.applied_seq();
    let target = match replica.log.last_seq().await {
        Ok(t) => t,
        Err(e) => {
            let _ = caught_up.send(Err(e));
            return;
        }
    };
    if from > target {
        // The stream holds less than this store applied: the cluster's data was lost or
        // reset, or this data directory belongs to another cluster. Following would skip
        // operations; refuse instead.
        let _ = caught_up.send(Err(ClusterError::Config(format!(
            "this replica's store has applied the cluster's log up to operation {from}, but the stream {} ends at {target}: the NATS cluster's data was lost or reset, or this data directory belongs to another cluster; start this replica with an empty data_dir to rebuild its store from the stream",
            crate::oplog::STREAM
        ))));
        return;
    }
    app.store.feed.numbered_by_log(from);
    replica.applied.send_replace(from);
    let mut caught_up = Some(caught_up);
    if from >= target {
        if let Some(tx) = caught_up.take() {
            let _ = tx.send(Ok(from));
        }
    }
    let mut ops = Box::pin(replica.log.follow(from));
    // Operations applied since the store's last flush: the command log's records reach the
    // disk, and the number applied is recorded, only at a flush; one is made once the log
    // pauses, and at least every second while operations keep coming.
    let mut unflushed = false;
    let mut flushed_at = tokio::time::Instant::now();
    loop {
        let item = tokio::select! {
            item = ops.next() => item,
            _ = tokio::time::sleep(FLUSH_PAUSE), if unflushed => {
                flush_applied(&app.store).await;
                unflushed = false;
                flushed_at = tokio::time::Instant::now();
                continue;
            }
            _ = app.shutdown.cancelled() => {
                if unflushed {
                    flush_applied(&app.store).await;
                }
                return;
            }
        };
        let (seq, payload) = match item {
            Some(Ok(x)) => x,
            Some(Err(e)) => {
                tracing::error!("the cluster's log cannot be followed any more: {e}; this replica stops applying changes (restart it once the cause is fixed)");
                if let Some(tx) = caught_up.take() {
                    let _ = tx.send(Err(e));
                }
                return;
            }
            None => return,
        };
        let env: Envelope = match serde_json::from_slice(&payload) {
            Ok(e) => e,
            Err(e) => {
                // Written by a newer version, or not by a replica: every replica skips it alike.
                tracing::error!(
                    seq,
                    "operation {seq} of the cluster's log is unreadable and is skipped: {e}"
                );
                app.store.set_applied(seq);
                replica.applied.send_replace(seq);
                unflushed = true;
                continue;
            }
        };
        let outcome = match app.store.apply(seq, &env.op) {
            Ok(o) => o,
            Err(e) => {
                // The local copy cannot take writes: stop applying (and answering as if
                // current); the operation stays in the log for when it can.
                tracing::error!(seq, op = env.op.name(), "cannot apply operation {seq} to this replica's store: {e}; this replica stops applying changes (fix the store, then restart it)");
                return;
            }
        };
        app.store.feed.applied(seq);
        let committed = Committed { seq, outcome };
        let waiter = replica.waiting().remove(&env.id);
        app.applied(&env.op, &committed, waiter.is_some());
        app.store.set_applied(seq);
        replica.applied.send_replace(seq);
        unflushed = true;
        if flushed_at.elapsed() >= FLUSH_EVERY {
            flush_applied(&app.store).await;
            unflushed = false;
            flushed_at = tokio::time::Instant::now();
        }
        if let Some(tx) = waiter {
            let _ = tx.send(committed);
        }
        if seq >= target {
            if let Some(tx) = caught_up.take() {
                let _ = tx.send(Ok(seq));
            }
        }
    }
}

/// Flushes the store (which records how far the cluster's log was applied).
async fn flush_applied(store: &Store) {
    if let Err(e) = store.flush().await {
        tracing::warn!("cannot flush this replica's store: {e} (a restart applies the cluster's log again from further back; nothing is lost)");
    }
}

impl App {
    /// What a replica does after applying an operation: memory follows the store; for another
    /// replica's operation, what its writer did for its own where this replica holds the tunnel.
    fn applied(self: &Arc<Self>, op: &Op, done: &Committed, mine: bool) {
        match (op, &done.outcome) {
            (Op::CommandSubmitted { command }, _) => {
                // As the store has it: an operation applied again (a replica catching up after
                // a restart) may be about a command that has ended, or been handed out, since.
                let mut c = match self.store.command(&command.id) {
                    Ok(Some(stored)) if stored.state.is_terminal() => {
                        self.commands.finish(&stored);
                        return;
                    }
                    Ok(Some(stored)) => stored,
                    _ => {
                        let mut c = command.clone();
                        c.pending_key = Store::pending_key(&c.gateway_id, done.seq);
                        c
                    }
                };
                c.handed_out = c.state != crate::store::CommandState::Queued;
                self.commands.insert(&c);
                if !mine && self.tunnels.get(&c.gateway_id).is_some() {
                    let app = self.clone();
                    self.tasks
                        .spawn(async move { crate::broker::deliver(&app, &c).await });
                }
            }
            (Op::CommandHandedOut { id }, Outcome::Command(Some(_))) => {
                self.commands.handed_out(id);
            }
            (Op::CommandEnded { .. }, Outcome::Command(Some(c))) => {
                self.commands.finish(c);
                self.waiters.notify(&c.id);
            }
            (Op::CommandCancelAsked { id, cancel }, Outcome::Command(Some(c))) => {
                self.commands.set_cancel(id, cancel);
                if !mine && self.tunnels.get(&c.gateway_id).is_some() {
                    let (app, c) = (self.clone(), (**c).clone());
                    self.tasks
                        .spawn(async move { crate::broker::send_cancel(&app, &c).await });
                }
            }
            (Op::GatewayChanged { id, patch }, Outcome::Gateway(Some(_)))
                if !mine && patch.revoked_ms.is_some() =>
            {
                self.tunnels.close(
                    id,
                    "this gateway was revoked by a tenant admin; pair it again with a new token",
                    true,
                );
            }
            _ => {}
        }
    }
}

/// Subject on which replicas tell each other how many tunnels they hold.
const LOAD_SUBJECT: &str = "pcg.replicas.load";
/// How often a replica says so, and after how long a silent replica no longer counts.
const LOAD_EVERY: Duration = Duration::from_secs(4);
const LOAD_STALE: Duration = Duration::from_secs(12);

#[derive(Serialize, Deserialize)]
struct Load {
    replica: String,
    tunnels: usize,
}

/// How many tunnels a replica holding `mine` of `loads` (every live replica's count, its own
/// included) asks to move elsewhere: none unless it holds more than its fair share by more than
/// a margin (two tunnels or a tenth of the share); then at most a quarter of its own at once.
pub fn excess(mine: usize, loads: &[usize]) -> usize {
    if loads.len() < 2 {
        return 0;
    }
    let fair = loads.iter().sum::<usize>().div_ceil(loads.len());
    let over = mine.saturating_sub(fair);
    if over <= (fair / 10).max(2) {
        return 0;
    }
    over.min((mine / 4).max(1))
}

/// Spreads the gateways over the replicas: every replica says how many tunnels it holds (NATS,
/// outside the log), and one holding far more than its share asks some gateways to reconnect
/// elsewhere (a Goodbye that is not permanent: a gateway redials its next broker). After it did,
/// it waits a round for the counts to follow before judging again.
pub async fn balance(app: Arc<App>) {
    let Some(replica) = app.log.replica() else {
        return;
    };
    let client = replica.log.client();
    let mut sub = match client.subscribe(LOAD_SUBJECT).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(
                "cannot hear the other replicas' loads: {e}; tunnels are not rebalanced"
            );
            return;
        }
    };
    let mut loads: HashMap<String, (usize, tokio::time::Instant)> = HashMap::new();
    let mut tick = tokio::time::interval(LOAD_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shed_last_round = false;
    loop {
        tokio::select! {
            msg = sub.next() => {
                let Some(msg) = msg else { return };
                if let Ok(l) = serde_json::from_slice::<Load>(&msg.payload) {
                    loads.insert(l.replica, (l.tunnels, tokio::time::Instant::now()));
                }
            }
            _ = tick.tick() => {
                let mine = app.tunnels.count();
                let me = Load { replica: replica.name.clone(), tunnels: mine };
                let body = serde_json::to_vec(&me).expect("loads serialise");
                if let Err(e) = client.publish(LOAD_SUBJECT, body.into()).await {
                    tracing::debug!("cannot tell the other replicas this one's load: {e}");
                }
                loads.retain(|_, (_, at)| at.elapsed() < LOAD_STALE);
                loads.insert(replica.name.clone(), (mine, tokio::time::Instant::now()));
                if shed_last_round {
                    shed_last_round = false;
                    continue;
                }
                let counts: Vec<usize> = loads.values().map(|(n, _)| *n).collect();
                let k = excess(mine, &counts);
                if k > 0 {
                    let n = app.tunnels.shed(
                        k,
                        "rebalancing: this broker holds more than its share of tunnels; reconnect to another one",
                        500 + rand::random_range(0..1_000u64),
                    );
                    tracing::info!(replica = %replica.name, shed = n, holding = mine, replicas = counts.len(), "asked gateways to move to another replica");
                    app.metrics.tunnels_shed.inc_by(n as u64);
                    shed_last_round = true;
                }
            }
            _ = app.shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_replica_well_over_its_share_sheds_and_never_all_at_once() {
        use super::excess;
        // Alone, or balanced within the margin: nothing.
        assert_eq!(excess(20, &[20]), 0);
        assert_eq!(excess(11, &[11, 9]), 0);
        assert_eq!(excess(12, &[12, 8]), 0);
        // Everything on one of two (after the other restarted): a quarter at a time, down to
        // the share.
        assert_eq!(excess(20, &[20, 0]), 5);
        assert_eq!(excess(15, &[15, 5]), 3);
        assert_eq!(excess(1000, &[1000, 0, 0]), 250);
        assert_eq!(excess(360, &[360, 320, 320]), 0);
        assert_eq!(excess(400, &[400, 300, 300]), 66);
        assert_eq!(excess(500, &[500, 250, 250]), 125);
        // The under-loaded never shed.
        assert_eq!(excess(0, &[20, 0]), 0);
    }
}
