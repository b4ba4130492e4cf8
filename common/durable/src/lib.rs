//! Group commit for sled 0.34: every caller that needs its writes durable asks one flusher
//! thread, which runs a single synchronous `Db::flush()` for everything that queued up while
//! the previous flush ran, then answers them all.
//!
//! Why not `Tree::flush_async`: concurrent `flush_async` calls deadlock in sled 0.34 (sled issue
//! 1308, fixed only on its unreleased main branch); pcg-saas hung here within seconds under
//! 16 concurrent submissions, with every sled I/O thread parked in `make_stable`. One flush at a
//! time avoids it, and batching the waiters keeps throughput.
//!
//! [`fs`] keeps data directories owner-only.

pub mod fs;

use std::sync::mpsc;
use std::thread;

use tokio::sync::oneshot;

type Reply = oneshot::Sender<Result<(), sled::Error>>;

/// Handle to the flusher thread of one sled database. Cloning shares the thread.
#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::Sender<Reply>,
    flushes: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl GroupCommit {
    /// Starts the flusher thread for `db`. It ends when every handle is dropped.
    pub fn new(db: sled::Db) -> GroupCommit {
        let (tx, rx) = mpsc::channel::<Reply>();
        let flushes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = flushes.clone();
        thread::Builder::new()
            .name("pcg-flush".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut waiters = vec![first];
                    waiters.extend(rx.try_iter());
                    let r = db.flush().map(|_| ());
                    counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    for w in waiters {
                        let _ = w.send(r.clone());
                    }
                }
            })
            .expect("the flusher thread starts");
        GroupCommit { tx, flushes }
    }

    /// Synchronous flushes done so far (each may have served many waiters).
    pub fn flushes(&self) -> u64 {
        self.flushes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until everything written before this call is durable.
    pub async fn flush(&self) -> Result<(), sled::Error> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(tx).map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Blocking variant, for code outside an async runtime.
    pub fn flush_blocking(&self) -> Result<(), sled::Error> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(tx).map_err(|_| closed())?;
        rx.blocking_recv().map_err(|_| closed())?
    }
}

fn closed() -> sled::Error {
    sled::Error::ReportableBug("the sled flusher thread has stopped".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_flushes_all_complete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::open(dir.path()).expect("open");
        let gc = GroupCommit::new(db.clone());
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
