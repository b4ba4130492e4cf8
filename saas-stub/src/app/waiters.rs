//! Long-polls waiting for commands to finish. An entry exists only while somebody waits on a
//! command that exists, belongs to the caller and is not finished; the last waiter to leave
//! removes it, so lookups (of any id, finished or not, found or not) leave nothing behind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Default)]
pub struct Waiters(Arc<Mutex<HashMap<String, Arc<Notify>>>>);

/// One waiter's registration; dropping it unregisters.
pub struct Waiter {
    map: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
    id: String,
    notify: Option<Arc<Notify>>,
}

impl Waiter {
    pub fn notify(&self) -> &Notify {
        self.notify
            .as_deref()
            .expect("set until the waiter is dropped")
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut m = self.map.lock().expect("waiters lock is never poisoned");
        // Drop our handle under the lock, so two waiters leaving together cannot both see the
        // other's handle and both keep the entry.
        drop(self.notify.take());
        if m.get(&self.id).is_some_and(|n| Arc::strong_count(n) == 1) {
            m.remove(&self.id);
        }
    }
}

impl Waiters {
    /// Registers a waiter for `command_id`.
    pub fn wait_for(&self, command_id: &str) -> Waiter {
        let notify = self
            .0
            .lock()
            .expect("waiters lock is never poisoned")
            .entry(command_id.to_string())
            .or_default()
            .clone();
        Waiter {
            map: self.0.clone(),
            id: command_id.to_string(),
            notify: Some(notify),
        }
    }

    /// Wakes everyone waiting on `command_id`.
    pub fn notify(&self, command_id: &str) {
        let n = self
            .0
            .lock()
            .expect("waiters lock is never poisoned")
            .get(command_id)
            .cloned();
        if let Some(n) = n {
            n.notify_waiters();
        }
    }

    /// Entries held (for tests and health).
    pub fn len(&self) -> usize {
        self.0.lock().expect("waiters lock is never poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_waiter_removes_the_entry() {
        let w = Waiters::default();
        let a = w.wait_for("c1");
        let b = w.wait_for("c1");
        assert_eq!(w.len(), 1);
        drop(a);
        assert_eq!(w.len(), 1);
        drop(b);
        assert!(w.is_empty());
    }

    #[tokio::test]
    async fn notify_wakes_a_registered_waiter() {
        let w = Arc::new(Waiters::default());
        let a = w.wait_for("c1");
        let n = a.notify().notified();
        tokio::pin!(n);
        n.as_mut().enable();
        w.notify("c1");
        tokio::time::timeout(std::time::Duration::from_secs(5), n)
            .await
            .expect("woken");
    }
}
