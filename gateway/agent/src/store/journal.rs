//! The command journal as an append-only log ([`pcg_durable::seglog`]), indexed in memory.
//!
//! Three kinds of record: an entry (`begin` writes it running, or done for a command cancelled
//! before it ran; `finish` writes it again, done with its result), a batch of
//! acknowledgements (its number, when it was written, the ids), and a forgetting (the ids a
//! retention pass drops, and the batch that held them). Memory holds where each entry's latest
//! record is, the ids still running and those done but not acknowledged (the outbox), and
//! where each batch is and when it was written: no read of the log but the records asked for.
//! Opening reads every segment once.
//!
//! An entry's latest record is live until retention forgets it; a batch is live until its
//! entries are forgotten. Whether a done entry was acknowledged is decided once everything is
//! read: copying forward may put an entry's record after its batch.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;

use pcg_durable::seglog::{self, Loc, Log, LogError, Segments};
use serde::{Deserialize, Serialize};

use super::{EntryState, JournalEntry, StoreError};

#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum RecRef<'a> {
    Entry(&'a JournalEntry),
    Acked {
        n: u64,
        at_ms: i64,
        ids: &'a [String],
    },
    Forget {
        ids: &'a [String],
        batch: Option<u64>,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Rec {
    Entry(Box<JournalEntry>),
    Acked {
        n: u64,
        at_ms: i64,
        ids: Vec<String>,
    },
    Forget {
        ids: Vec<String>,
        batch: Option<u64>,
    },
}

/// Where an entry's latest record is, and what it says.
struct Slot {
    at: Loc,
    running: bool,
    has_result: bool,
}

/// A batch of acknowledgements: when it was written, where.
struct Batch {
    at_ms: i64,
    at: Loc,
}

/// What names a live record.
enum Key {
    Entry(String),
    Batch(u64),
}

#[derive(Default)]
struct Entries {
    by_id: HashMap<String, Slot>,
    /// Entries still running (after a crash: those whose execution must be resumed).
    running: BTreeSet<String>,
    /// Done entries without an acknowledgement: the outbox.
    unacked: BTreeSet<String>,
    /// Batches of acknowledgements, by number (the order they were written in).
    batches: BTreeMap<u64, Batch>,
    next_batch: u64,
    /// Acknowledged, not written yet.
    gathered: Vec<String>,
    /// While the log is read at open: the ids of every batch.
    replayed_acks: HashSet<String>,
}

impl seglog::Index for Entries {
    type Key = Key;

    fn replay(&mut self, segs: &mut Segments, at: Loc, payload: &[u8]) -> Result<(), String> {
        match serde_json::from_slice::<Rec>(payload) {
            Ok(Rec::Entry(e)) => self.put(segs, &e, at),
            Ok(Rec::Acked { n, at_ms, ids }) => {
                self.replayed_acks.extend(ids);
                self.next_batch = self.next_batch.max(n + 1);
                self.batches.insert(n, Batch { at_ms, at });
                segs.set_live(at, true);
            }
            Ok(Rec::Forget { ids, batch }) => self.forget(segs, &ids, batch),
            Err(_) => return Err("an unreadable journal record".into()),
        }
        Ok(())
    }

    fn live_in(&self, seg: u32) -> Vec<(Key, Loc)> {
        let entries = self
            .by_id
            .iter()
            .filter(|(_, s)| s.at.seg == seg)
            .map(|(id, s)| (Key::Entry(id.clone()), s.at));
        let batches = self
            .batches
            .iter()
            .filter(|(_, b)| b.at.seg == seg)
            .map(|(&n, b)| (Key::Batch(n), b.at));
        entries.chain(batches).collect()
    }

    fn moved(&mut self, key: &Key, to: Loc) {
        match key {
            Key::Entry(id) => {
                if let Some(s) = self.by_id.get_mut(id) {
                    s.at = to;
                }
            }
            Key::Batch(n) => {
                if let Some(b) = self.batches.get_mut(n) {
                    b.at = to;
                }
            }
        }
    }
}

impl Entries {
    /// `e`'s latest record is at `at`.
    fn put(&mut self, segs: &mut Segments, e: &JournalEntry, at: Loc) {
        let slot = Slot {
            at,
            running: e.state == EntryState::Running,
            has_result: e.state == EntryState::Done && e.result.is_some(),
        };
        if let Some(old) = self.by_id.insert(e.id.clone(), slot) {
            segs.set_live(old.at, false);
        }
        segs.set_live(at, true);
    }

    /// Appends `e` (`payload`: its record) and files it: running, or done with its result in
    /// the outbox.
    fn append(&mut self, segs: &mut Segments, e: &JournalEntry, payload: &[u8]) {
        let at = segs.append(payload);
        self.put(segs, e, at);
        if e.state == EntryState::Running {
            self.running.insert(e.id.clone());
        } else {
            self.running.remove(&e.id);
            if e.result.is_some() {
                self.unacked.insert(e.id.clone());
            }
        }
    }

    fn forget(&mut self, segs: &mut Segments, ids: &[String], batch: Option<u64>) {
        for id in ids {
            if let Some(s) = self.by_id.remove(id) {
                segs.set_live(s.at, false);
            }
            self.running.remove(id);
            self.unacked.remove(id);
        }
        if let Some(b) = batch.and_then(|n| self.batches.remove(&n)) {
            segs.set_live(b.at, false);
        }
    }

    /// After the log is read: which entries run, which wait for an acknowledgement.
    fn settle(&mut self) {
        let acked = std::mem::take(&mut self.replayed_acks);
        for (id, s) in &self.by_id {
            if s.running {
                self.running.insert(id.clone());
            } else if s.has_result && !acked.contains(id) {
                self.unacked.insert(id.clone());
            }
        }
    }

    /// Appends what was acknowledged since the last batch as one.
    fn write_gathered(&mut self, segs: &mut Segments, at_ms: i64) {
        if self.gathered.is_empty() {
            return;
        }
        let ids = std::mem::take(&mut self.gathered);
        let n = self.next_batch;
        self.next_batch += 1;
        let payload = serde_json::to_vec(&RecRef::Acked {
            n,
            at_ms,
            ids: &ids,
        })
        .expect("records serialise");
        let at = segs.append(&payload);
        segs.set_live(at, true);
        self.batches.insert(n, Batch { at_ms, at });
    }
}

/// The journal (one per store).
pub(super) struct Journal {
    log: Log<Entries>,
}

fn decode(payload: &[u8], log: &Path, at: Loc) -> Result<Rec, StoreError> {
    serde_json::from_slice(payload).map_err(|e| StoreError::Corrupt {
        what: format!(
            "journal record at byte {} of {}",
            at.off,
            log.join(seglog::segment_name(at.seg)).display()
        ),
        message: e.to_string(),
    })
}

impl Journal {
    /// Opens the journal in `dir` (made if missing).
    pub(super) fn open(dir: &Path, segment_bytes: u64) -> Result<Journal, StoreError> {
        let log = Log::open(dir, segment_bytes, "pcg-gateway", Entries::default())?;
        log.lock().index.settle();
        Ok(Journal { log })
    }

    fn read(&self, reader: seglog::Reader, at: Loc) -> Result<Rec, StoreError> {
        decode(&reader.read()?, self.log.dir(), at)
    }

    pub(super) fn get(&self, id: &str) -> Result<Option<JournalEntry>, StoreError> {
        let (reader, at) = {
            let st = self.log.lock();
            let Some(s) = st.index.by_id.get(id) else {
                return Ok(None);
            };
            (st.segs.reader(s.at), s.at)
        };
        match self.read(reader, at)? {
            Rec::Entry(e) => Ok(Some(*e)),
            _ => Err(StoreError::Corrupt {
                what: format!("journal entry {id}"),
                message: "its record is not an entry".into(),
            }),
        }
    }

    /// Appends `e` unless its id is known: `false` then (checked and written under one lock:
    /// two deliveries racing cannot both write). Refused once a sync has failed: an entry that
    /// cannot become durable must not be known as journaled (a redelivery would run it).
    pub(super) fn begin(&self, e: &JournalEntry) -> Result<bool, StoreError> {
        let payload = serde_json::to_vec(&RecRef::Entry(e)).expect("entries serialise");
        let mut st = self.log.lock();
        let st = &mut *st;
        if st.index.by_id.contains_key(&e.id) {
            return Ok(false);
        }
        self.log.refuse_if_failed(&st.segs)?;
        st.index.append(&mut st.segs, e, &payload);
        Ok(true)
    }

    /// Appends `done` (an entry with its result): it leaves the running ones for the outbox.
    /// Refused once a sync has failed (the caller keeps the result and tries again).
    pub(super) fn finish(&self, done: &JournalEntry) -> Result<(), StoreError> {
        let payload = serde_json::to_vec(&RecRef::Entry(done)).expect("entries serialise");
        let mut st = self.log.lock();
        let st = &mut *st;
        self.log.refuse_if_failed(&st.segs)?;
        st.index.append(&mut st.segs, done, &payload);
        Ok(())
    }

    /// `id` leaves the outbox; its acknowledgement joins the next batch.
    pub(super) fn ack(&self, id: &str) {
        let mut st = self.log.lock();
        if st.index.unacked.remove(id) {
            st.index.gathered.push(id.to_string());
        }
    }

    /// Appends the acknowledgements gathered since the last batch (not synced).
    pub(super) fn write_acks(&self, now_ms: i64) {
        let mut st = self.log.lock();
        let st = &mut *st;
        st.index.write_gathered(&mut st.segs, now_ms);
    }

    /// Makes everything appended durable.
    pub(super) fn sync(&self) -> Result<(), LogError> {
        self.log.sync()
    }

    pub(super) fn unacked(&self) -> Vec<String> {
        self.log.lock().index.unacked.iter().cloned().collect()
    }

    pub(super) fn is_unacked(&self, id: &str) -> bool {
        self.log.lock().index.unacked.contains(id)
    }

    pub(super) fn running(&self) -> Vec<String> {
        self.log.lock().index.running.iter().cloned().collect()
    }

    /// Entries held, and results waiting for an acknowledgement.
    pub(super) fn counts(&self) -> (usize, usize) {
        let st = self.log.lock();
        (st.index.by_id.len(), st.index.unacked.len())
    }

    /// Whether `id` is in a batch written or gathered (for tests).
    #[cfg(test)]
    pub(super) fn acknowledged(&self, id: &str) -> bool {
        let (readers, gathered) = {
            let st = self.log.lock();
            let readers: Vec<_> = st
                .index
                .batches
                .values()
                .map(|b| (st.segs.reader(b.at), b.at))
                .collect();
            (readers, st.index.gathered.iter().any(|i| i == id))
        };
        gathered
            || readers.into_iter().any(|(r, at)| {
                matches!(self.read(r, at), Ok(Rec::Acked { ids, .. }) if ids.iter().any(|i| i == id))
            })
    }

    /// Batches written (for tests).
    #[cfg(test)]
    pub(super) fn batches(&self) -> usize {
        self.log.lock().index.batches.len()
    }

    /// Acknowledged ids not written yet (for tests).
    #[cfg(test)]
    pub(super) fn gathered(&self) -> usize {
        self.log.lock().index.gathered.len()
    }

    /// Segment files (for tests).
    #[cfg(test)]
    pub(super) fn segments(&self) -> usize {
        self.log.lock().segs.count()
    }

    /// Forgets the entries of the batches written before `cutoff_ms` (the acknowledgements
    /// gathered are written first), then deletes the segments left with nothing live; returns
    /// how many entries went. The forgetting is synced before any segment is deleted.
    pub(super) fn prune(&self, now_ms: i64, cutoff_ms: i64) -> Result<usize, StoreError> {
        self.write_acks(now_ms);
        let old: Vec<(u64, seglog::Reader, Loc)> = {
            let st = self.log.lock();
            st.index
                .batches
                .iter()
                .take_while(|(_, b)| b.at_ms < cutoff_ms)
                .map(|(&n, b)| (n, st.segs.reader(b.at), b.at))
                .collect()
        };
        let mut n = 0;
        for (batch, reader, at) in old {
            let ids = match self.read(reader, at)? {
                Rec::Acked { ids, .. } => ids,
                _ => Vec::new(),
            };
            let payload = serde_json::to_vec(&RecRef::Forget {
                ids: &ids,
                batch: Some(batch),
            })
            .expect("records serialise");
            let mut st = self.log.lock();
            let st = &mut *st;
            n += ids
                .iter()
                .filter(|id| st.index.by_id.contains_key(*id))
                .count();
            st.segs.append(&payload);
            st.index.forget(&mut st.segs, &ids, Some(batch));
        }
        self.log.compact()?;
        Ok(n)
    }

    /// Adds what an earlier version kept in sled: the entries the log lacks, and
    /// acknowledgements (when, which id) as batches. Not synced.
    pub(super) fn import(&self, entries: Vec<JournalEntry>, mut acked: Vec<(i64, String)>) {
        {
            let mut st = self.log.lock();
            let st = &mut *st;
            for mut e in entries {
                if st.index.by_id.contains_key(&e.id) {
                    continue;
                }
                e.acked_ms = None;
                let payload = serde_json::to_vec(&RecRef::Entry(&e)).expect("entries serialise");
                st.index.append(&mut st.segs, &e, &payload);
            }
        }
        acked.sort();
        for chunk in acked.chunks(1024) {
            let at_ms = chunk.last().map_or(0, |(ms, _)| *ms);
            let mut st = self.log.lock();
            let st = &mut *st;
            for (_, id) in chunk {
                st.index.unacked.remove(id);
            }
            st.index.gathered = chunk.iter().map(|(_, id)| id.clone()).collect();
            st.index.write_gathered(&mut st.segs, at_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoredResult;

    fn running(id: &str) -> JournalEntry {
        JournalEntry {
            id: id.into(),
            kind: "gateway.echo".into(),
            payload: serde_json::json!({"pad": "x".repeat(200)}),
            state: EntryState::Running,
            received_ms: 1,
            result: None,
            acked_ms: None,
            deadline_ms: None,
        }
    }

    fn done(id: &str) -> JournalEntry {
        JournalEntry {
            state: EntryState::Done,
            result: Some(StoredResult {
                ok: true,
                output: serde_json::json!(1),
                error_class: String::new(),
                error_message: String::new(),
                started_ms: 1,
                finished_ms: 2,
            }),
            ..running(id)
        }
    }

    /// Many small segments: retention forgets the acknowledged entries and their segments go;
    /// what is kept (one entry still running from the first segment, the outbox, the batch of
    /// an entry not old enough) is copied forward, and reads the same after a reopen, the
    /// copied entries still acknowledged.
    #[test]
    fn retention_deletes_old_segments_and_what_is_kept_survives_a_reopen() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let j = Journal::open(dir.path(), 4096).expect("open");
            assert!(j.begin(&running("keep")).expect("begin"));
            for i in 0..200 {
                let id = format!("c{i:03}");
                assert!(j.begin(&running(&id)).expect("begin"));
                assert!(!j.begin(&running(&id)).expect("begin"), "once per id");
                j.finish(&done(&id)).expect("finish");
                if i < 190 {
                    j.ack(&id);
                }
                j.write_acks(1_000 + i);
                j.sync().expect("sync");
            }
            let before = j.segments();
            assert!(before > 10, "{before} segments");
            // The batches of c000..c179 are older than the cutoff; c180..c189's are not.
            assert_eq!(j.prune(5_000, 1_180).expect("prune"), 180);
            assert!(j.segments() <= 3, "{} segments left", j.segments());
            assert_eq!(j.counts(), (21, 10));
        }
        let j = Journal::open(dir.path(), 4096).expect("reopen");
        assert_eq!(j.counts(), (21, 10), "entries, outbox");
        assert_eq!(j.running(), ["keep"]);
        let outbox: Vec<String> = (190..200).map(|i| format!("c{i:03}")).collect();
        assert_eq!(j.unacked(), outbox);
        assert!(j.acknowledged("c185"), "copied forward, still acknowledged");
        assert!(j.get("c005").expect("read").is_none(), "forgotten");
        let e = j.get("c195").expect("read").expect("kept");
        assert_eq!(e.state, EntryState::Done);
        assert_eq!(j.prune(5_000, 1_190).expect("prune"), 10);
        assert_eq!(j.counts(), (11, 10));
    }
}
