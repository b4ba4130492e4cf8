//! The operation log (`pcg_saas::oplog`) against a real three-node NATS JetStream cluster
//! (Debian `nats-server` 2.9, mutual TLS with the certificates `pcg-saas cluster init` makes):
//! two replicas append concurrently and every follower sees every operation once, in one order;
//! a retried append is stored once; with one node of three stopped the log still takes appends
//! and a follower keeps reading; with two stopped an append fails naming the quorum, within a
//! bound; once they are back, a follower that ran throughout has everything, with no gap and no
//! repetition; `follow(after = N)` starts at N + 1.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use pcg_e2e::nats::{self, NatsCluster};
use pcg_e2e::test_dir;
use pcg_saas::cluster::{ClusterConfig, ClusterError};
use pcg_saas::oplog::OpLog;

/// A three-node cluster and the PKI it was started with.
struct Env {
    dir: tempfile::TempDir,
    cluster: NatsCluster,
}

/// The operation log's warnings (re-created consumers, retries) in the test's output.
fn logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("pcg_saas=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Starts the cluster, or None (the test skips) when nats-server is not installed.
async fn start() -> Option<Env> {
    if !nats::available() {
        return None;
    }
    logging();
    let dir = test_dir();
    let pki = dir.path().join("pki");
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    pcg_saas::cluster::init(
        &pki,
        &names(&["node1", "node2", "node3"]),
        &names(&["replica1", "replica2"]),
        &names(&["127.0.0.1", "localhost"]),
    )
    .unwrap();
    let started = Instant::now();
    let mut cluster = NatsCluster::start(&dir.path().join("nats"), &pki)
        .await
        .unwrap();
    cluster.wait_ready(Duration::from_secs(90)).await.unwrap();
    eprintln!("cluster formed in {:?}", started.elapsed());
    Some(Env { dir, cluster })
}

impl Env {
    fn config(&self, replica: &str) -> ClusterConfig {
        let pki = self.dir.path().join("pki");
        ClusterConfig {
            nats_urls: self.cluster.urls(),
            ca_file: pki.join("internal-ca.pem"),
            cert_file: pki.join(format!("replica-{replica}.pem")),
            key_file: pki.join(format!("replica-{replica}.key")),
            stream_replicas: 3,
            request_timeout_ms: 3000,
        }
    }

    /// Opens the log as `replica`. Right after the cluster formed, JetStream may not place a
    /// stream on three nodes yet: tried again for up to 60 s.
    async fn open(&self, replica: &str) -> OpLog {
        let cfg = self.config(replica);
        let started = Instant::now();
        loop {
            match OpLog::open(&cfg, replica).await {
                Ok(log) => {
                    eprintln!("{replica} opened the log in {:?}", started.elapsed());
                    return log;
                }
                Err(e) if started.elapsed() < Duration::from_secs(60) => {
                    eprintln!("{replica}: open: {e}; again");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => panic!("{replica} cannot open the log: {e}"),
            }
        }
    }

    /// The index of the node `log` is connected to (its server name is `node<i+1>`).
    fn node_of(&self, log: &OpLog) -> usize {
        let server = log.server();
        self.cluster
            .nodes
            .iter()
            .position(|n| server.starts_with(&format!("{} ", n.name)))
            .unwrap_or_else(|| panic!("connected to an unknown node: {server}"))
    }
}

/// What a follower has yielded so far, read by a task of its own.
struct Follower {
    items: Arc<Mutex<Vec<(u64, Bytes)>>>,
    error: Arc<Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Follower {
    fn start(log: &OpLog, after: u64) -> Follower {
        let items = Arc::new(Mutex::new(Vec::new()));
        let error = Arc::new(Mutex::new(None));
        let mut stream = Box::pin(log.follow(after));
        let (items2, error2) = (items.clone(), error.clone());
        let task = tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                match item {
                    Ok(x) => items2.lock().unwrap().push(x),
                    Err(e) => {
                        *error2.lock().unwrap() = Some(e.to_string());
                        return;
                    }
                }
            }
            *error2.lock().unwrap() = Some("the follower's stream ended".into());
        });
        Follower { items, error, task }
    }

    /// Waits until it has yielded at least `n` operations, within `within`; returns them all.
    async fn wait_len(&self, n: usize, within: Duration) -> Vec<(u64, Bytes)> {
        let started = Instant::now();
        loop {
            if let Some(e) = self.error.lock().unwrap().clone() {
                panic!("the follower ended: {e}");
            }
            let items = self.items.lock().unwrap().clone();
            if items.len() >= n {
                return items;
            }
            assert!(
                started.elapsed() < within,
                "the follower has {} operations of {n} after {within:?}; last {:?}",
                items.len(),
                items.last().map(|i| i.0)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Asserts the sequences are `after + 1, after + 2, ...`: nothing skipped, nothing repeated.
fn assert_consecutive(items: &[(u64, Bytes)], after: u64) {
    for (i, (seq, _)) in items.iter().enumerate() {
        assert_eq!(
            *seq,
            after + 1 + i as u64,
            "item {i} has sequence {seq}; the sequences around it: {:?}",
            items[i.saturating_sub(3)..(i + 3).min(items.len())]
                .iter()
                .map(|x| x.0)
                .collect::<Vec<_>>()
        );
    }
}

fn id_of(payload: &Bytes) -> String {
    String::from_utf8(payload.to_vec()).unwrap()
}

/// Appends `ids` concurrently (one task each), the payload being the id; every one must be
/// acknowledged. Returns id -> sequence, and the most appends seen in flight at once.
async fn append_all(log: &OpLog, ids: Vec<String>) -> (HashMap<String, u64>, usize) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for id in ids {
        let (log, in_flight, most) = (log.clone(), in_flight.clone(), most.clone());
        tasks.spawn(async move {
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            let r = log.append(&id, Bytes::from(id.clone())).await;
            in_flight.fetch_sub(1, Ordering::SeqCst);
            (id, r)
        });
    }
    let mut acked = HashMap::new();
    while let Some(r) = tasks.join_next().await {
        let (id, r) = r.unwrap();
        let seq = r.unwrap_or_else(|e| panic!("append {id}: {e}"));
        assert!(acked.insert(id, seq).is_none());
    }
    (acked, most.load(Ordering::SeqCst))
}

/// Appends `id` until it is acknowledged (the same id each time: stored once), within
/// `within`; returns its sequence and how long it took.
async fn append_until_acked(log: &OpLog, id: &str, within: Duration) -> (u64, Duration) {
    let started = Instant::now();
    loop {
        let t = Instant::now();
        match log.append(id, Bytes::from(id.to_string())).await {
            Ok(seq) => return (seq, started.elapsed()),
            Err(e) => {
                eprintln!("append {id} failed after {:?}: {e}", t.elapsed());
                assert!(
                    started.elapsed() < within,
                    "append {id} not acknowledged within {within:?}: {e}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_append_concurrently_and_every_follower_sees_one_order() {
    let Some(env) = start().await else { return };
    let a = env.open("replica1").await;
    let b = env.open("replica2").await;
    assert_eq!(a.last_seq().await.unwrap(), 0);
    let fa = Follower::start(&a, 0);
    let fb = Follower::start(&b, 0);

    // 500 appends from each replica, all at once.
    let started = Instant::now();
    let ids = |who: &str| (0..500).map(|i| format!("{who}-{i}")).collect::<Vec<_>>();
    let ((from_a, most_a), (from_b, most_b)) =
        tokio::join!(append_all(&a, ids("a")), append_all(&b, ids("b")));
    eprintln!(
        "1,000 appends acknowledged in {:?} (at most {most_a} + {most_b} in flight)",
        started.elapsed()
    );
    assert!(
        most_a > 1 && most_b > 1,
        "appends were not concurrent: {most_a}, {most_b}"
    );
    let mut acked = from_a;
    acked.extend(from_b);
    let mut seqs: Vec<u64> = acked.values().copied().collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=1000).collect::<Vec<u64>>());

    // Both followers: all 1,000, once each, in the same order, sequences 1, 2, 3, ...
    let started = Instant::now();
    let seen_a = fa.wait_len(1000, Duration::from_secs(60)).await;
    let seen_b = fb.wait_len(1000, Duration::from_secs(60)).await;
    eprintln!("both followers had all 1,000 {:?} later", started.elapsed());
    assert_consecutive(&seen_a, 0);
    assert_eq!(seen_a, seen_b, "the followers disagree on the order");
    for (seq, payload) in &seen_a {
        assert_eq!(acked[&id_of(payload)], *seq, "{}", id_of(payload));
    }

    // A retried append is stored once, whatever its payload, and answers the first sequence.
    let again = a.append("a-7", Bytes::from_static(b"a-7")).await.unwrap();
    assert_eq!(again, acked["a-7"]);
    let again = b
        .append("b-499", Bytes::from_static(b"something else"))
        .await
        .unwrap();
    assert_eq!(again, acked["b-499"]);
    assert_eq!(a.last_seq().await.unwrap(), 1000);
    assert_eq!(b.last_seq().await.unwrap(), 1000);
    // And the followers did not see them: the next thing they see is the next new append.
    assert_eq!(a.append("a-500", "a-500".into()).await.unwrap(), 1001);
    for f in [&fa, &fb] {
        let seen = f.wait_len(1001, Duration::from_secs(30)).await;
        assert_eq!(seen.len(), 1001);
        assert_eq!(seen[1000], (1001, Bytes::from_static(b"a-500")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_rides_out_one_node_down_and_names_a_lost_quorum() {
    let Some(mut env) = start().await else { return };
    let writer = env.open("replica1").await;
    let reader = env.open("replica2").await;
    let follower = Follower::start(&reader, 0);
    let ids = |what: &str, n: usize| (0..n).map(|i| format!("{what}-{i}")).collect::<Vec<_>>();

    let (mut acked, _) = append_all(&writer, ids("before", 50)).await;
    follower.wait_len(50, Duration::from_secs(60)).await;

    // One node of three down — the one the follower is connected to: the follower moves.
    let first = env.node_of(&reader);
    eprintln!(
        "stopping {} (the follower's node; the writer is on {})",
        env.cluster.nodes[first].name,
        writer.server()
    );
    env.cluster.kill(first);
    let (seq, took) = append_until_acked(&writer, "one-down-0", Duration::from_secs(60)).await;
    eprintln!("one node down: the first append was acknowledged after {took:?}");
    acked.insert("one-down-0".into(), seq);
    let started = Instant::now();
    let (more, _) = append_all(&writer, ids("one-down", 101)[1..].to_vec()).await;
    eprintln!("one node down: 100 appends in {:?}", started.elapsed());
    acked.extend(more);
    let started = Instant::now();
    follower
        .wait_len(acked.len(), Duration::from_secs(60))
        .await;
    eprintln!(
        "one node down: the follower (now on {}) caught up {:?} later",
        reader.server(),
        started.elapsed()
    );

    // Two down: no quorum, said within a bound.
    let second = (0..3)
        .find(|&i| i != first && env.cluster.nodes[i].proc.is_some())
        .unwrap();
    eprintln!("stopping {}", env.cluster.nodes[second].name);
    env.cluster.kill(second);
    let mut attempted = Vec::new();
    for i in 0..3 {
        let id = format!("no-quorum-{i}");
        let started = Instant::now();
        let r = writer.append(&id, Bytes::from(id.clone())).await;
        let took = started.elapsed();
        attempted.push(id);
        let err = match r {
            // The node that stayed can only have acknowledged it before it knew it was alone.
            Ok(seq) => panic!("append acknowledged by one node of three: {seq}"),
            Err(e) => e,
        };
        eprintln!("two nodes down: append failed after {took:?}: {err}");
        assert!(matches!(err, ClusterError::NoQuorum { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("no quorum") && text.contains("2 of them"),
            "{text}"
        );
        assert!(took < Duration::from_secs(30), "answered after {took:?}");
    }
    // Not asserted: the node left may still answer with what it has.
    eprintln!("two nodes down: last_seq: {:?}", writer.last_seq().await);

    // Both back.
    let started = Instant::now();
    env.cluster.restart(first).unwrap();
    env.cluster.restart(second).unwrap();
    env.cluster
        .wait_ready(Duration::from_secs(90))
        .await
        .unwrap();
    eprintln!(
        "both nodes back: cluster ready after {:?}",
        started.elapsed()
    );
    let (seq, took) = append_until_acked(&writer, "back-0", Duration::from_secs(90)).await;
    eprintln!(
        "both nodes back: the first append was acknowledged {took:?} after the cluster was ready"
    );
    acked.insert("back-0".into(), seq);
    let (more, _) = append_all(&writer, ids("back", 101)[1..].to_vec()).await;
    acked.extend(more);
    // The appends that failed may or may not have been stored: asking again with the same ids
    // stores those that were not, and answers the sequence of those that were.
    for id in attempted {
        let seq = writer.append(&id, Bytes::from(id.clone())).await.unwrap();
        acked.insert(id, seq);
    }

    let last = writer.last_seq().await.unwrap();
    assert_eq!(
        last,
        acked.len() as u64,
        "the log holds exactly what was acknowledged"
    );
    let started = Instant::now();
    let seen = follower
        .wait_len(last as usize, Duration::from_secs(90))
        .await;
    eprintln!(
        "the follower that ran throughout had all {last} {:?} later",
        started.elapsed()
    );
    assert_eq!(seen.len() as u64, last);
    assert_consecutive(&seen, 0);
    let mut by_id = HashMap::new();
    for (seq, payload) in &seen {
        let id = id_of(payload);
        assert!(by_id.insert(id.clone(), *seq).is_none(), "{id} seen twice");
    }
    assert_eq!(by_id, acked);
}

/// The next operation of a follower, within 30 s.
async fn next_op<S>(s: &mut S) -> (u64, String)
where
    S: futures_util::Stream<Item = Result<(u64, Bytes), ClusterError>> + Unpin,
{
    let (seq, payload) = tokio::time::timeout(Duration::from_secs(30), s.next())
        .await
        .expect("an operation within 30 s")
        .expect("the follower goes on")
        .expect("no error");
    (seq, id_of(&payload))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_after_n_starts_at_n_plus_one() {
    let Some(env) = start().await else { return };
    let log = env.open("replica1").await;
    for i in 1..=20u64 {
        let id = format!("op-{i}");
        assert_eq!(log.append(&id, Bytes::from(id.clone())).await.unwrap(), i);
    }
    assert_eq!(log.last_seq().await.unwrap(), 20);

    let mut from_start = Box::pin(log.follow(0));
    assert_eq!(next_op(&mut from_start).await, (1, "op-1".to_string()));
    let mut from_12 = Box::pin(log.follow(12));
    for want in 13..=20u64 {
        assert_eq!(next_op(&mut from_12).await, (want, format!("op-{want}")));
    }

    // At the end: the next append. Beyond the end: N + 1 once the log gets there.
    let mut at_end = Box::pin(log.follow(20));
    let at_end = tokio::spawn(async move { next_op(&mut at_end).await });
    let mut ahead = Box::pin(log.follow(24));
    let ahead = tokio::spawn(async move { next_op(&mut ahead).await });
    for i in 21..=26u64 {
        let id = format!("op-{i}");
        assert_eq!(log.append(&id, Bytes::from(id.clone())).await.unwrap(), i);
    }
    assert_eq!(at_end.await.unwrap(), (21, "op-21".to_string()));
    assert_eq!(ahead.await.unwrap(), (25, "op-25".to_string()));
}

/// The harness's wait for the cluster names a node that has exited, with the nodes' logs, at
/// once instead of running out its bound for a cluster that cannot form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_exits_is_named_at_once_by_the_clusters_wait() {
    let Some(mut env) = start().await else {
        return;
    };
    env.cluster.nodes[1]
        .proc
        .as_mut()
        .expect("node2 runs")
        .kill();
    let e = env
        .cluster
        .wait_ready(Duration::from_secs(90))
        .await
        .expect_err("node2 is gone")
        .to_string();
    assert!(e.contains("nats-server node2 exited"), "{e}");
    assert!(e.contains("--- node2 ---"), "with the logs: {e}");
}
