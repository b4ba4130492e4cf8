//! Group commit for sled 0.34 and the logs kept beside it: every caller that needs its writes
//! durable asks one flusher thread, which runs a single synchronous flush (`Db::flush()`, then
//! the logs' syncs) for everything that queued up while the previous flush ran, then answers
//! them all.
//!
//! Why not `Tree::flush_async`: concurrent `flush_async` calls deadlock in sled 0.34 (sled issue
//! 1308, fixed only on its unreleased main branch); pcg-saas hung here within seconds under
//! 16 concurrent submissions, with every sled I/O thread parked in `make_stable`. One flush at a
//! time avoids it, and batching the waiters keeps throughput. The thread is a [`Batches`], which
//! serves any such group commit.
//!
//! [`fs`] keeps data directories owner-only; [`seglog`] is an append-only log of records in
//! segment files, indexed in memory by its owner.

pub mod fs;
pub mod seglog;

use std::sync::mpsc;
use std::thread;

use tokio::sync::oneshot;

type Request<T, R> = (T, oneshot::Sender<R>);

/// A thread that takes every request queued while it was busy, handles them as one batch, and
/// gives each the batch's answer: group commit for whatever makes writes durable (sled's flush
/// here, an append-only file's write and `fdatasync` in the gateway's ledger). Cloning shares
/// the thread; it ends when every handle is dropped.
pub struct Batches<T, R> {
    tx: mpsc::Sender<Request<T, R>>,
}

impl<T, R> Clone for Batches<T, R> {
    fn clone(&self) -> Self {
        Batches {
            tx: self.tx.clone(),
        }
    }
}

impl<T: Send + 'static, R: Clone + Send + 'static> Batches<T, R> {
    /// Starts the thread `name`, which runs `handle` once per batch.
    pub fn start(name: &str, mut handle: impl FnMut(&[T]) -> R + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel::<Request<T, R>>();
        thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let (items, answers): (Vec<T>, Vec<oneshot::Sender<R>>) =
                        std::iter::once(first).chain(rx.try_iter()).unzip();
                    let r = handle(&items);
                    for a in answers {
                        let _ = a.send(r.clone());
                    }
                }
            })
            .unwrap_or_else(|e| panic!("the {name} thread starts: {e}"));
        Batches { tx }
    }

    /// Queues `item` and waits for its batch's answer (`None`: the thread has stopped).
    pub async fn ask(&self, item: T) -> Option<R> {
        let (tx, rx) = oneshot::channel();
        self.tx.send((item, tx)).ok()?;
        rx.await.ok()
    }
}

/// Handle to the flusher thread of one store: whatever the store makes durable with it (sled's
/// flush and the logs kept beside it, in the order their records depend on each other), and
/// `E`, what a flush fails with (cloned for every waiter). Cloning shares the thread.
pub struct GroupCommit<E> {
    flusher: Batches<(), Result<(), E>>,
    flushes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stopped: fn() -> E,
}

impl<E> Clone for GroupCommit<E> {
    fn clone(&self) -> Self {
        GroupCommit {
            flusher: self.flusher.clone(),
            flushes: self.flushes.clone(),
            stopped: self.stopped,
        }
    }
}

impl<E: Clone + Send + 'static> GroupCommit<E> {
    /// Starts the flusher thread, which runs `flush` once per batch of waiters; `stopped` is
    /// the error of a flush asked of a thread that has stopped. The thread ends when every
    /// handle is dropped.
    pub fn new(
        mut flush: impl FnMut() -> Result<(), E> + Send + 'static,
        stopped: fn() -> E,
    ) -> GroupCommit<E> {
        let flushes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = flushes.clone();
        let flusher = Batches::start("pcg-flush", move |_: &[()]| {
            let r = flush();
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            r
        });
        GroupCommit {
            flusher,
            flushes,
            stopped,
        }
    }

    /// Synchronous flushes done so far (each may have served many waiters).
    pub fn flushes(&self) -> u64 {
        self.flushes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until everything written before this call is durable.
    pub async fn flush(&self) -> Result<(), E> {
        self.flusher
            .ask(())
            .await
            .unwrap_or_else(|| Err((self.stopped)()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_item_is_handled_once_and_answered_with_its_batch() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let handled = seen.clone();
        let b = Batches::start("test-batches", move |items: &[u32]| {
            handled.lock().expect("lock").extend_from_slice(items);
            items.len()
        });
        let tasks: Vec<_> = (0u32..300)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { b.ask(i).await.expect("answered") })
            })
            .collect();
        for t in tasks {
            let n = t.await.expect("task");
            assert!((1..=300).contains(&n), "a batch of {n}");
        }
        let mut seen = seen.lock().expect("lock").clone();
        seen.sort_unstable();
        assert_eq!(seen, (0u32..300).collect::<Vec<_>>(), "each item once");
        // Once the others are answered, a request is a batch of its own.
        let alone = b.ask(7).await;
        assert_eq!(alone, Some(1), "alone, a batch of one");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_flushes_all_complete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::open(dir.path()).expect("open");
        let gc = GroupCommit::new(
            {
                let db = db.clone();
                move || db.flush().map(|_| ())
            },
            || sled::Error::ReportableBug("stopped".into()),
        );
        let mut tasks = Vec::new();
        for i in 0u32..500 {
            let db = db.clone();
            let gc = gc.clone();
            tasks.push(tokio::spawn(async move {
                db.insert(i.to_be_bytes(), vec![0u8; 64]).expect("insert");
                gc.flush().await.expect("flush");
            }));
        }
        for t in tasks {
            tokio::time::timeout(std::time::Duration::from_secs(60), t)
                .await
                .expect("no deadlock")
                .expect("task");
        }
        assert_eq!(db.len(), 500);
    }
}
