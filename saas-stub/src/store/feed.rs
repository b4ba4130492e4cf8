//! The tenant feed: what the broker carries, as one ordered, durable log per tenant that a
//! subscriber reads from a sequence number and resumes from after a disconnect.
//!
//! Every record the feed points at (a command submitted, a command's result, an event, a health
//! report) takes its sequence number from one allocator, and the feed tree holds
//! `tenant \0 seq` → `topic byte, at_ms, reference` for the tenant's records. The record itself is
//! written first and its feed entry last, so an entry always points at something readable.
//!
//! Sequence numbers are handed out before the writes they number, by concurrent writers, so an
//! entry with a lower number can land after one with a higher number. A subscriber must never
//! move past a number whose entry may still come, nor see an entry a crash could take back: it
//! reads only up to the *durable horizon*, the highest number below which every allocated number
//! has finished writing and been flushed. [`Feed::visible`] is taken before each flush and
//! published once the flush is done ([`Feed::made_durable`]).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Notify};

use super::StoreError;

/// A topic of the feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    /// A command submitted (to one of the tenant's gateways).
    Commands,
    /// A command ended (its final record, with the result).
    Results,
    /// The tenant's events (`gateway.*`, `machine.*`, `token.*`, ...).
    Events,
    /// A gateway's health report.
    Health,
}

impl Topic {
    pub const ALL: [Topic; 4] = [
        Topic::Commands,
        Topic::Results,
        Topic::Events,
        Topic::Health,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Topic::Commands => "commands",
            Topic::Results => "results",
            Topic::Events => "events",
            Topic::Health => "health",
        }
    }

    pub fn parse(s: &str) -> Option<Topic> {
        Topic::ALL.into_iter().find(|t| t.as_str() == s)
    }

    fn byte(self) -> u8 {
        match self {
            Topic::Commands => b'c',
            Topic::Results => b'r',
            Topic::Events => b'e',
            Topic::Health => b'h',
        }
    }

    fn of_byte(b: u8) -> Option<Topic> {
        Topic::ALL.into_iter().find(|t| t.byte() == b)
    }
}

/// One entry of a tenant's feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub topic: Topic,
    pub at_ms: i64,
    /// What it points at: a command id (commands, results), a health key (health); empty for
    /// events (the event's key is `seq`).
    pub reference: Vec<u8>,
}

#[derive(Default)]
struct Numbers {
    /// Allocated and not yet finished writing.
    in_flight: BTreeSet<u64>,
    /// The highest allocated.
    last: u64,
    /// A replica's: its numbers are the cluster log's, none is allocated here.
    by_log: bool,
}

/// The feed's index and its sequence numbers (one per store).
pub struct Feed {
    db: sled::Db,
    tree: sled::Tree,
    /// Per tenant, the highest sequence number retention removed.
    pruned: sled::Tree,
    numbers: Mutex<Numbers>,
    durable: watch::Sender<u64>,
    written: Notify,
    subscribers: AtomicUsize,
}

/// A sequence number being written; dropping it marks the write finished (or abandoned).
pub struct Ticket<'a> {
    feed: &'a Feed,
    pub seq: u64,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.feed.lock().in_flight.remove(&self.seq);
        // Only a subscriber needs a prompt flush: with none, waking the pump costs for nothing.
        if self.feed.subscribers.load(Ordering::Relaxed) > 0 {
            self.feed.written.notify_one();
        }
    }
}

/// Counts a subscriber while it lives (the feed is flushed promptly only when someone reads it).
pub struct SubscriberGuard(Arc<Feed>);

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.0.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

fn key(tenant_id: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant_id.len() + 9);
    k.extend_from_slice(tenant_id.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn corrupt(message: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        tree: "feed",
        message: message.into(),
    }
}

fn decode(prefix_len: usize, k: &[u8], v: &[u8]) -> Result<Entry, StoreError> {
    let seq = k
        .get(prefix_len..prefix_len + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| corrupt("short key"))?;
    let topic = v
        .first()
        .and_then(|b| Topic::of_byte(*b))
        .ok_or_else(|| corrupt(format!("unknown topic in entry {seq}")))?;
    let at_ms = v
        .get(1..9)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(i64::from_be_bytes)
        .ok_or_else(|| corrupt(format!("short entry {seq}")))?;
    Ok(Entry {
        seq,
        topic,
        at_ms,
        reference: v[9..].to_vec(),
    })
}

impl Feed {
    pub(super) fn open(db: &sled::Db) -> Result<Feed, StoreError> {
        // Everything on disk at start is durable, and every number handed out from now on is
        // above every number already used (sled's ids only grow, across restarts too).
        let start = db.generate_id()?;
        let (durable, _) = watch::channel(start);
        Ok(Feed {
            tree: db.open_tree("feed")?,
            pruned: db.open_tree("feed_pruned")?,
            db: db.clone(),
            numbers: Mutex::new(Numbers {
                in_flight: BTreeSet::new(),
                last: start,
                by_log: false,
            }),
            durable,
            written: Notify::new(),
            subscribers: AtomicUsize::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Numbers> {
        self.numbers.lock().expect("feed lock is never poisoned")
    }

    /// A new sequence number, held in flight until the ticket is dropped. Refused on a
    /// replica ([`Feed::numbered_by_log`]): a number from the store's own counter would not be
    /// the log's.
    pub fn ticket(&self) -> Result<Ticket<'_>, StoreError> {
        let mut n = self.lock();
        if n.by_log {
            return Err(StoreError::OutsideTheLog);
        }
        let seq = self.db.generate_id()?;
        n.in_flight.insert(seq);
        n.last = n.last.max(seq);
        Ok(Ticket { feed: self, seq })
    }

    /// The highest number below which every allocated number has finished writing.
    pub fn visible(&self) -> u64 {
        let n = self.lock();
        match n.in_flight.first() {
            Some(first) => first.saturating_sub(1),
            None => n.last,
        }
    }

    /// Everything up to `horizon` is flushed: subscribers may read it.
    pub fn made_durable(&self, horizon: u64) {
        self.durable.send_if_modified(|d| {
            let newer = horizon > *d;
            if newer {
                *d = horizon;
            }
            newer
        });
    }

    /// Operation `seq` of a cluster's log is applied (its entries written): everything up to it
    /// is durable (the log's quorum holds it) and applied in order, so subscribers may read it.
    pub fn applied(&self, seq: u64) {
        {
            let mut n = self.lock();
            n.last = n.last.max(seq);
        }
        self.made_durable(seq);
    }

    /// This store is a replica's copy of a cluster's log, applied up to operation `applied`:
    /// its feed is numbered by the log, not by the store's own counter, so the horizon is the
    /// last operation applied. (A reopened store's counter jumps ahead of anything it handed
    /// out — sled adds twice its persistence interval on recovery — far past the log's
    /// numbers; a horizon left there would hide every operation applied after a restart.)
    /// Called before the replica applies anything or serves a subscriber; from then on no
    /// number is allocated here ([`Feed::ticket`] refuses).
    pub fn numbered_by_log(&self, applied: u64) {
        {
            let mut n = self.lock();
            n.last = applied;
            n.by_log = true;
        }
        self.durable.send_replace(applied);
    }

    /// The durable horizon, and its changes.
    pub fn horizon(&self) -> watch::Receiver<u64> {
        self.durable.subscribe()
    }

    /// The durable horizon now.
    pub fn durable(&self) -> u64 {
        *self.durable.borrow()
    }

    /// Resolves when a ticket was dropped since the last call (a write finished).
    pub async fn written(&self) {
        self.written.notified().await;
    }

    pub fn subscribers(&self) -> usize {
        self.subscribers.load(Ordering::Relaxed)
    }

    /// Counts a subscriber until the guard is dropped.
    pub fn subscribe(self: &Arc<Self>) -> SubscriberGuard {
        self.subscribers.fetch_add(1, Ordering::Relaxed);
        self.written.notify_one();
        SubscriberGuard(self.clone())
    }

    /// Records that `seq` (a record already written) belongs to `tenant_id`'s feed.
    pub(super) fn record(
        &self,
        tenant_id: &str,
        seq: u64,
        topic: Topic,
        at_ms: i64,
        reference: &[u8],
    ) -> Result<(), StoreError> {
        let mut v = Vec::with_capacity(9 + reference.len());
        v.push(topic.byte());
        v.extend_from_slice(&at_ms.to_be_bytes());
        v.extend_from_slice(reference);
        self.tree.insert(key(tenant_id, seq), v)?;
        Ok(())
    }

    /// `tenant_id`'s entries after `after` up to `upto` (both sequence numbers), oldest first, at
    /// most `limit`.
    pub fn read(
        &self,
        tenant_id: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        if after >= upto {
            return Ok(out);
        }
        let prefix_len = tenant_id.len() + 1;
        for kv in self
            .tree
            .range(key(tenant_id, after + 1)..=key(tenant_id, upto))
        {
            let (k, v) = kv?;
            out.push(decode(prefix_len, &k, &v)?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The highest sequence number of `tenant_id`'s feed that retention removed (0: none).
    pub fn pruned_through(&self, tenant_id: &str) -> Result<u64, StoreError> {
        Ok(self
            .pruned
            .get(tenant_id.as_bytes())?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes))
    }

    /// Deletes entries older than `cutoff_ms`; returns how many.
    pub(super) fn prune(&self, cutoff_ms: i64) -> Result<usize, StoreError> {
        let mut n = 0;
        let mut through: std::collections::HashMap<Vec<u8>, u64> = Default::default();
        for kv in self.tree.iter() {
            let (k, v) = kv?;
            let Some(split) = k.iter().position(|b| *b == 0) else {
                continue;
            };
            let e = decode(split + 1, &k, &v)?;
            if e.at_ms < cutoff_ms {
                self.tree.remove(&k)?;
                let t = through.entry(k[..split].to_vec()).or_default();
                *t = (*t).max(e.seq);
                n += 1;
            }
        }
        for (tenant, seq) in through {
            self.mark_pruned(&String::from_utf8_lossy(&tenant), seq)?;
        }
        Ok(n)
    }

    /// Records that retention removed `tenant_id`'s entries up to `seq` (kept elsewhere: the
    /// command log's).
    pub(super) fn mark_pruned(&self, tenant_id: &str, seq: u64) -> Result<(), StoreError> {
        self.pruned.fetch_and_update(tenant_id.as_bytes(), |old| {
            let old = old
                .and_then(|v| <[u8; 8]>::try_from(v).ok())
                .map_or(0, u64::from_be_bytes);
            Some(old.max(seq).to_be_bytes().to_vec())
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed() -> (tempfile::TempDir, Feed) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new().path(dir.path()).open().expect("open");
        let feed = Feed::open(&db).expect("feed");
        (dir, feed)
    }

    #[test]
    fn the_horizon_never_passes_a_number_still_being_written() {
        let (_dir, feed) = feed();
        let start = feed.visible();
        let a = feed.ticket().expect("a");
        let b = feed.ticket().expect("b");
        assert!(b.seq > a.seq && a.seq > start);
        // The later number finishes first: a reader must not move past the earlier one.
        feed.record("t", b.seq, Topic::Events, 1, &[]).expect("b");
        let b_seq = b.seq;
        drop(b);
        assert_eq!(feed.visible(), a.seq - 1);
        feed.record("t", a.seq, Topic::Results, 2, b"c_1")
            .expect("a");
        let a_seq = a.seq;
        drop(a);
        assert_eq!(feed.visible(), b_seq);

        // Published only once made durable; read in order, per tenant.
        let mut rx = feed.horizon();
        assert_eq!(*rx.borrow_and_update(), start);
        feed.made_durable(feed.visible());
        assert_eq!(*rx.borrow_and_update(), b_seq);
        feed.made_durable(start); // an older flush finishing late does not move it back
        assert_eq!(*feed.horizon().borrow(), b_seq);
        let got = feed.read("t", start, b_seq, 10).expect("read");
        assert_eq!(
            got.iter().map(|e| (e.seq, e.topic)).collect::<Vec<_>>(),
            vec![(a_seq, Topic::Results), (b_seq, Topic::Events)]
        );
        assert_eq!(got[0].reference, b"c_1");
        assert!(feed.read("u", start, b_seq, 10).expect("read").is_empty());
        assert!(feed.read("t", b_seq, b_seq, 10).expect("read").is_empty());
        assert_eq!(feed.read("t", start, b_seq, 1).expect("read").len(), 1);

        // Retention: entries older than the cutoff go, and the tenant's gap is remembered.
        assert_eq!(feed.pruned_through("t").expect("pruned"), 0);
        assert_eq!(feed.prune(2).expect("prune"), 1);
        assert_eq!(feed.pruned_through("t").expect("pruned"), b_seq);
        assert_eq!(
            feed.read("t", start, b_seq, 10).expect("read")[0].seq,
            a_seq
        );
    }

    #[test]
    fn numbers_keep_growing_across_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let last = {
            let db = sled::Config::new().path(dir.path()).open().expect("open");
            let feed = Feed::open(&db).expect("feed");
            let t = feed.ticket().expect("ticket");
            feed.record("t", t.seq, Topic::Events, 1, &[])
                .expect("record");
            db.flush().expect("flush");
            t.seq
        };
        let db = sled::Config::new().path(dir.path()).open().expect("open");
        let feed = Feed::open(&db).expect("feed");
        // What was on disk at start is readable at once; new numbers come after it.
        assert!(*feed.horizon().borrow() >= last);
        assert_eq!(
            feed.read("t", 0, feed.visible(), 10).expect("read").len(),
            1
        );
        assert!(feed.ticket().expect("ticket").seq > last);
    }

    #[test]
    fn a_replica_reopened_reads_its_feed_by_the_logs_numbers() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = sled::Config::new().path(dir.path()).open().expect("open");
            let feed = Feed::open(&db).expect("feed");
            feed.numbered_by_log(0);
            for seq in 1..=3 {
                feed.record("t", seq, Topic::Results, 1, b"c")
                    .expect("record");
                feed.applied(seq);
            }
            assert_eq!(feed.durable(), 3);
            db.flush().expect("flush");
        }
        let db = sled::Config::new().path(dir.path()).open().expect("open");
        let feed = Feed::open(&db).expect("feed");
        // Left to the store's counter, the horizon would be far past the log's numbers.
        assert!(feed.durable() > 1_000_000, "{}", feed.durable());
        feed.numbered_by_log(3);
        assert_eq!((feed.durable(), feed.visible()), (3, 3));
        let mut rx = feed.horizon();
        rx.borrow_and_update();
        feed.record("t", 4, Topic::Results, 1, b"d")
            .expect("record");
        feed.applied(4);
        assert_eq!(*rx.borrow_and_update(), 4);
        let got = feed.read("t", 3, feed.durable(), 10).expect("read");
        assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4]);
        // A flush publishes what was applied, nothing beyond.
        feed.made_durable(feed.visible());
        assert_eq!(feed.durable(), 4);
        // Nothing is numbered here any more: a record outside the log is refused.
        assert!(matches!(feed.ticket(), Err(StoreError::OutsideTheLog)));
        assert_eq!(feed.visible(), 4);
    }
}
