//! [`Sessions`]: logged-in clients by endpoint, shared by every command, with single-flight
//! logins.
//!
//! The map is locked only to look up or update a slot, never across I/O: a login in progress is
//! a slot other callers wait on without holding the lock, so an endpoint that does not answer
//! delays only the commands addressed to it. Callers that ask for an endpoint whose login is
//! under way wait for that login and share its outcome (one login, or one failure, for all of
//! them); the login runs in its own task, so it completes (and settles its slot) even when every
//! caller gave up waiting. A failed login leaves no slot behind: the next caller tries again.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use crate::{ProviderError, Result};

type Outcome<V> = Option<Result<V>>;

enum Slot<V> {
    Ready(V),
    /// A login under way; `id` tells it apart from a later login of the same key.
    Pending {
        id: u64,
        rx: watch::Receiver<Outcome<V>>,
    },
}

struct Map<V> {
    slots: HashMap<String, Slot<V>>,
    next_id: u64,
}

/// Logged-in clients (`V`, cheap to clone: a handle) by a key naming the endpoint and the
/// credentials.
pub struct Sessions<V> {
    map: Arc<Mutex<Map<V>>>,
}

impl<V> Default for Sessions<V> {
    fn default() -> Self {
        Self {
            map: Arc::new(Mutex::new(Map {
                slots: HashMap::new(),
                next_id: 0,
            })),
        }
    }
}

fn lock<V>(m: &Mutex<Map<V>>) -> MutexGuard<'_, Map<V>> {
    // Nothing panics while holding this lock (map operations only); recover the data if it did.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Settles the slot of one login when its task ends, however it ends: `Ready` on success,
/// removed on failure or panic, and only if the slot still belongs to this login.
struct Settle<V> {
    map: Arc<Mutex<Map<V>>>,
    key: String,
    id: u64,
    ok: Option<V>,
}

impl<V> Drop for Settle<V> {
    fn drop(&mut self) {
        let mut m = lock(&self.map);
        if matches!(m.slots.get(&self.key), Some(Slot::Pending { id, .. }) if *id == self.id) {
            match self.ok.take() {
                Some(v) => {
                    m.slots.insert(self.key.clone(), Slot::Ready(v));
                }
                None => {
                    m.slots.remove(&self.key);
                }
            }
        }
    }
}

impl<V: Clone + Send + Sync + 'static> Sessions<V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// The client for `key`: the cached one, the one a login under way produces, or a new one
    /// from `connect` (run in its own task). Must be called within a tokio runtime.
    pub async fn get_or_connect<F, Fut>(&self, key: &str, connect: F) -> Result<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V>> + Send + 'static,
    {
        let mut rx = {
            let mut m = lock(&self.map);
            match m.slots.get(key) {
                Some(Slot::Ready(v)) => return Ok(v.clone()),
                Some(Slot::Pending { rx, .. }) => rx.clone(),
                None => {
                    let id = m.next_id;
                    m.next_id += 1;
                    let (tx, rx) = watch::channel(None);
                    m.slots
                        .insert(key.to_owned(), Slot::Pending { id, rx: rx.clone() });
                    let login = connect();
                    let mut settle = Settle {
                        map: self.map.clone(),
                        key: key.to_owned(),
                        id,
                        ok: None,
                    };
                    tokio::spawn(async move {
                        let outcome = login.await;
                        settle.ok = outcome.as_ref().ok().cloned();
                        // The slot is settled before the waiters wake, so a caller that comes
                        // after them finds the client (or no slot) rather than this login.
                        drop(settle);
                        tx.send_replace(Some(outcome));
                    });
                    rx
                }
            }
        };
        let outcome = rx.wait_for(Option::is_some).await.map(|o| o.clone());
        match outcome {
            Ok(Some(r)) => r,
            _ => Err(ProviderError::ProviderFault {
                endpoint: key.split('|').next().unwrap_or(key).to_owned(),
                message: "the login task ended without an outcome (it panicked); try again".into(),
            }),
        }
    }

    /// Forgets the client of `key` (a later call logs in again), or the login under way for it
    /// (it completes, but its client is not kept). Returns the client that was cached.
    pub fn remove(&self, key: &str) -> Option<V> {
        match lock(&self.map).slots.remove(key) {
            Some(Slot::Ready(v)) => Some(v),
            _ => None,
        }
    }

    /// How many clients are cached and logins under way (diagnostics and tests).
    pub fn len(&self) -> usize {
        lock(&self.map).slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn refused(n: usize) -> ProviderError {
        ProviderError::Unreachable {
            component: crate::Component::Bmc,
            endpoint: format!("e{n}"),
            reason: "refused".into(),
        }
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_login_and_one_failure() {
        let s: Arc<Sessions<usize>> = Arc::new(Sessions::new());
        let logins = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for _ in 0..5 {
            let (s, logins, gate) = (s.clone(), logins.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                s.get_or_connect("a", move || async move {
                    let n = logins.fetch_add(1, Ordering::SeqCst);
                    gate.notified().await;
                    Ok(n + 100)
                })
                .await
            }));
        }
        // Every caller is waiting on the one login.
        while logins.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), 100);
        }
        assert_eq!(logins.load(Ordering::SeqCst), 1);
        // Cached now.
        let again = s.get_or_connect("a", || async { Ok(7) }).await.unwrap();
        assert_eq!(again, 100);

        // A failure is shared by those who waited, and not kept.
        let fails = Arc::new(AtomicUsize::new(0));
        let (a, b) = tokio::join!(
            s.get_or_connect("b", {
                let fails = fails.clone();
                move || async move {
                    fails.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Err(refused(1))
                }
            }),
            async {
                while s.len() < 2 {
                    tokio::task::yield_now().await;
                }
                s.get_or_connect("b", || async { Ok(1) }).await
            }
        );
        assert!(a.is_err() && b.is_err(), "{a:?} {b:?}");
        assert_eq!(fails.load(Ordering::SeqCst), 1);
        assert_eq!(s.get_or_connect("b", || async { Ok(2) }).await.unwrap(), 2);
    }

    #[tokio::test]
    async fn a_slow_login_does_not_delay_another_key() {
        let s: Arc<Sessions<usize>> = Arc::new(Sessions::new());
        let never = {
            let s = s.clone();
            tokio::spawn(async move {
                s.get_or_connect("dead", std::future::pending::<Result<usize>>)
                    .await
            })
        };
        while s.is_empty() {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            s.get_or_connect("live", || async { Ok(3) }).await.unwrap(),
            3
        );
        assert!(!never.is_finished());
        never.abort();
    }

    #[tokio::test]
    async fn removed_keys_log_in_again_and_a_stale_login_is_not_kept() {
        let s: Sessions<usize> = Sessions::new();
        assert_eq!(s.get_or_connect("k", || async { Ok(1) }).await.unwrap(), 1);
        assert_eq!(s.remove("k"), Some(1));
        assert_eq!(s.get_or_connect("k", || async { Ok(2) }).await.unwrap(), 2);
        // A login removed while under way completes for its waiters but is not cached.
        let gate = Arc::new(tokio::sync::Notify::new());
        s.remove("k");
        let g = gate.clone();
        let (r, ()) = tokio::join!(
            s.get_or_connect("k", move || async move {
                g.notified().await;
                Ok(3)
            }),
            async {
                while s.is_empty() {
                    tokio::task::yield_now().await;
                }
                s.remove("k");
                gate.notify_one();
            }
        );
        assert_eq!(r.unwrap(), 3);
        assert_eq!(s.get_or_connect("k", || async { Ok(4) }).await.unwrap(), 4);
    }

    #[tokio::test]
    async fn a_panicking_login_fails_its_callers_and_leaves_no_slot() {
        let s: Sessions<usize> = Sessions::new();
        let r = s
            .get_or_connect("p", || async { panic!("login exploded") })
            .await;
        assert_eq!(r.unwrap_err().kind(), crate::ErrorKind::ProviderFault);
        assert!(s.is_empty());
    }
}
