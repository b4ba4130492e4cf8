//! Commands as an append-only log ([`pcg_durable::seglog`]), their indexes in memory.
//!
//! Every change to a command appends its whole record (`put`) to the log; retention appends
//! the ids it drops (`forget`). Nothing is rewritten in place. Memory holds, per command, where
//! its latest record is, the keys of its two indexes (a tenant's commands newest first; the
//! commands still waiting for a result, in the order they were queued) and its entries in its
//! tenant's feed: about 400 bytes, not the record. Opening the log reads every segment once to
//! rebuild them.
//!
//! Why not sled, as the rest of the store: a command touched eight sled keys on one node (its
//! record twice, the pending and tenant indexes, two feed entries, the lookups), and sled's cost
//! per key (walking its tree, splitting nodes, rewriting pages, writing them out) was the
//! largest single share of pcg-saas's CPU per command (BENCHMARKS.md, "Commands as an
//! append-only log").
//!
//! On disk: `cmdlog/NNNNNNNN.log` segments (frames, torn ends, failed syncs and the deletion
//! of old segments: [`pcg_durable::seglog`]). Appends stay in memory until [`CmdLog::sync`],
//! which the store's group commit calls after sled's flush: what sled holds that a command
//! depends on (an idempotency key's claim) is never behind the command. A record is live while
//! it is its command's latest and the command is kept (pending, or kept by retention).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::path::Path;

use pcg_durable::seglog::{self, Loc, Log, Segments};
use serde::{Deserialize, Serialize};

use super::feed::{Entry, Topic};
use super::{Command, StoreError};

/// Size past which a sync closes the segment and begins the next.
pub const SEGMENT_BYTES: u64 = seglog::SEGMENT_BYTES;
/// A range of the tenant index.
type KeyRange = (Bound<Box<[u8]>>, Bound<Box<[u8]>>);
/// Ids per `forget` record.
const FORGET_CHUNK: usize = 1024;

#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum RecRef<'a> {
    Put(&'a Command),
    Forget(&'a [String]),
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Rec {
    Put(Box<Command>),
    Forget(Vec<String>),
}

/// Where a command's latest record is, and its index keys.
struct Slot {
    at: Loc,
    terminal: bool,
    tenant_key: Box<[u8]>,
    pending_key: Box<[u8]>,
}

/// A command's entry in its tenant's feed: submitted (`results` false) or ended.
struct FeedRef {
    results: bool,
    at_ms: i64,
    id: Box<str>,
}

/// The log's index: every command's latest record, by id, by tenant, pending, in the feed.
#[derive(Default)]
struct Commands {
    by_id: HashMap<String, Slot>,
    by_tenant: BTreeSet<Box<[u8]>>,
    pending: BTreeMap<Box<[u8]>, String>,
    /// Per tenant, the feed entries of its commands by sequence number (kept until the feed's
    /// retention drops them: [`CmdLog::prune_feed`]).
    feed: HashMap<Box<str>, BTreeMap<u64, FeedRef>>,
}

/// The commands' log (one per store).
pub struct CmdLog {
    log: Log<Commands>,
}

/// `tenant \0 (u64::MAX - submitted_ms) \0 id`: a tenant's commands, newest first.
pub fn tenant_key(tenant_id: &str, submitted_ms: i64, id: &str) -> Vec<u8> {
    let mut k = tenant_id.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&(u64::MAX - u64::try_from(submitted_ms).unwrap_or(0)).to_be_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

impl seglog::Index for Commands {
    type Key = String;

    fn replay(&mut self, segs: &mut Segments, at: Loc, payload: &[u8]) -> Result<(), String> {
        match serde_json::from_slice::<Rec>(payload) {
            Ok(Rec::Put(c)) => self.index(segs, &c, at),
            Ok(Rec::Forget(ids)) => {
                for id in ids {
                    self.forget(segs, &id);
                }
            }
            Err(_) => return Err("an unreadable record".into()),
        }
        Ok(())
    }

    fn live_in(&self, seg: u32) -> Vec<(String, Loc)> {
        self.by_id
            .iter()
            .filter(|(_, s)| s.at.seg == seg)
            .map(|(id, s)| (id.clone(), s.at))
            .collect()
    }

    fn moved(&mut self, id: &String, to: Loc) {
        if let Some(s) = self.by_id.get_mut(id) {
            s.at = to;
        }
    }
}

impl CmdLog {
    /// Opens the log in `dir` (made if missing, owner-only) and rebuilds its indexes.
    pub fn open(dir: &Path) -> Result<CmdLog, StoreError> {
        Self::open_sized(dir, SEGMENT_BYTES)
    }

    pub(crate) fn open_sized(dir: &Path, segment_bytes: u64) -> Result<CmdLog, StoreError> {
        let log = Log::open(dir, segment_bytes, "pcg-saas", Commands::default())?;
        Ok(CmdLog { log })
    }

    /// Writes `c` as its command's latest record (not yet written to disk: [`CmdLog::sync`]).
    /// A record that has not ended does not replace one that has: returns whether it was
    /// written.
    pub fn put(&self, c: &Command) -> Result<bool, StoreError> {
        let payload = serde_json::to_vec(&RecRef::Put(c)).expect("records serialise");
        let mut st = self.log.lock();
        let st = &mut *st;
        if !c.state.is_terminal() && st.index.by_id.get(&c.id).is_some_and(|s| s.terminal) {
            return Ok(false);
        }
        let at = st.segs.append(&payload);
        st.index.index(&mut st.segs, c, at);
        Ok(true)
    }

    /// Whether a record of `id` is held.
    pub fn contains(&self, id: &str) -> bool {
        self.log.lock().index.by_id.contains_key(id)
    }

    /// Whether `id` is held and has not ended.
    pub fn is_pending(&self, id: &str) -> bool {
        self.log
            .lock()
            .index
            .by_id
            .get(id)
            .is_some_and(|s| !s.terminal)
    }

    /// Commands held (ended or not).
    pub fn count(&self) -> usize {
        self.log.lock().index.by_id.len()
    }

    /// `id`'s latest record.
    pub fn get(&self, id: &str) -> Result<Option<Command>, StoreError> {
        let (reader, at) = {
            let st = self.log.lock();
            let Some(s) = st.index.by_id.get(id) else {
                return Ok(None);
            };
            (st.segs.reader(s.at), s.at)
        };
        let payload = reader.read()?;
        match serde_json::from_slice::<Rec>(&payload) {
            Ok(Rec::Put(c)) => Ok(Some(*c)),
            _ => Err(StoreError::Corrupt {
                tree: "commands",
                message: format!(
                    "{}: not a command's record at byte {} of segment {}",
                    self.log.dir().display(),
                    at.off,
                    seglog::segment_name(at.seg)
                ),
            }),
        }
    }

    /// Every command still waiting for a result, in the order they were queued.
    pub fn pending(&self) -> Result<Vec<Command>, StoreError> {
        let ids: Vec<String> = self.log.lock().index.pending.values().cloned().collect();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(c) = self.get(&id)? {
                if !c.state.is_terminal() {
                    out.push(c);
                }
            }
        }
        Ok(out)
    }

    /// `tenant_id`'s part of the tenant index: from `tenant \0` to `tenant \1`.
    fn tenant_range(tenant_id: &str) -> KeyRange {
        let mut from = tenant_id.as_bytes().to_vec();
        from.push(0);
        let mut to = from.clone();
        *to.last_mut().expect("one byte") = 1;
        (Bound::Included(from.into()), Bound::Excluded(to.into()))
    }

    /// Ids of `tenant_id`'s commands, newest first (read from the index a page at a time).
    pub fn tenant_ids<'a>(&'a self, tenant_id: &str) -> impl Iterator<Item = String> + 'a {
        let skip = tenant_id.len() + 1 + 8 + 1;
        let (mut from, to) = Self::tenant_range(tenant_id);
        let mut page: std::vec::IntoIter<Box<[u8]>> = Vec::new().into_iter();
        let mut done = false;
        std::iter::from_fn(move || loop {
            if let Some(k) = page.next() {
                return Some(String::from_utf8_lossy(&k[skip.min(k.len())..]).into_owned());
            }
            if done {
                return None;
            }
            let keys: Vec<Box<[u8]>> = self
                .log
                .lock()
                .index
                .by_tenant
                .range((from.clone(), to.clone()))
                .take(256)
                .cloned()
                .collect();
            done = keys.len() < 256;
            if let Some(k) = keys.last() {
                from = Bound::Excluded(k.clone());
            }
            page = keys.into_iter();
        })
    }

    /// Drops `tenants`' ended commands submitted before `cutoff_ms` (from memory at once, from
    /// disk as their segments go) and returns their ids. The forgetting is appended, not synced.
    pub fn prune(&self, tenants: &[String], cutoff_ms: i64) -> Result<Vec<String>, StoreError> {
        let mut gone = Vec::new();
        {
            let st = self.log.lock();
            for t in tenants {
                let at_of = t.len() + 1;
                // Oldest first: the index runs newest first.
                for k in st.index.by_tenant.range(Self::tenant_range(t)).rev() {
                    let at = k
                        .get(at_of..at_of + 8)
                        .and_then(|b| <[u8; 8]>::try_from(b).ok())
                        .map(|b| u64::MAX - u64::from_be_bytes(b))
                        .unwrap_or(u64::MAX);
                    if i64::try_from(at).unwrap_or(i64::MAX) >= cutoff_ms {
                        break;
                    }
                    let id = String::from_utf8_lossy(&k[(at_of + 9).min(k.len())..]).into_owned();
                    if st.index.by_id.get(&id).is_some_and(|s| s.terminal) {
                        gone.push(id);
                    }
                }
            }
        }
        for chunk in gone.chunks(FORGET_CHUNK) {
            let payload = serde_json::to_vec(&RecRef::Forget(chunk)).expect("records serialise");
            let mut st = self.log.lock();
            let st = &mut *st;
            st.segs.append(&payload);
            for id in chunk {
                st.index.forget(&mut st.segs, id);
            }
        }
        self.compact()?;
        Ok(gone)
    }

    /// Deletes the oldest segments that hold nothing live, copying forward what little is.
    pub fn compact(&self) -> Result<usize, StoreError> {
        Ok(self.log.compact()?)
    }

    /// Makes everything appended before this call durable.
    pub fn sync(&self) -> Result<(), StoreError> {
        Ok(self.log.sync()?)
    }

    /// `tenant_id`'s commands' feed entries after `after` up to `upto`, oldest first, at most
    /// `limit`.
    pub fn feed_read(&self, tenant_id: &str, after: u64, upto: u64, limit: usize) -> Vec<Entry> {
        if after >= upto {
            return Vec::new();
        }
        let st = self.log.lock();
        let Some(t) = st.index.feed.get(tenant_id) else {
            return Vec::new();
        };
        t.range(after + 1..=upto)
            .take(limit)
            .map(|(&seq, f)| Entry {
                seq,
                topic: if f.results {
                    Topic::Results
                } else {
                    Topic::Commands
                },
                at_ms: f.at_ms,
                reference: f.id.as_bytes().to_vec(),
            })
            .collect()
    }

    /// Per tenant, the highest number of the feed entries older than `cutoff_ms` (what
    /// [`CmdLog::prune_feed`] would drop).
    pub fn feed_older_than(&self, cutoff_ms: i64) -> Vec<(String, u64)> {
        let st = self.log.lock();
        st.index
            .feed
            .iter()
            .filter_map(|(tenant, entries)| {
                let highest = entries
                    .iter()
                    .filter(|(_, f)| f.at_ms < cutoff_ms)
                    .map(|(&seq, _)| seq)
                    .max()?;
                Some((tenant.to_string(), highest))
            })
            .collect()
    }

    /// Drops the feed entries older than `cutoff_ms`; returns how many.
    pub fn prune_feed(&self, cutoff_ms: i64) -> usize {
        let mut st = self.log.lock();
        let mut n = 0;
        st.index.feed.retain(|_, entries| {
            let before = entries.len();
            entries.retain(|_, f| f.at_ms >= cutoff_ms);
            n += before - entries.len();
            !entries.is_empty()
        });
        n
    }

    /// Segment files on disk (for tests and the size of the data directory).
    pub fn segments(&self) -> usize {
        self.log.lock().segs.count()
    }
}

impl Commands {
    /// Records that `c`'s latest record is at `at`.
    fn index(&mut self, segs: &mut Segments, c: &Command, at: Loc) {
        let terminal = c.state.is_terminal();
        if let Some(old) = self.by_id.get_mut(&c.id) {
            let was = old.at;
            old.at = at;
            let ended = terminal && !old.terminal;
            if ended {
                let key = std::mem::take(&mut old.pending_key);
                self.pending.remove(&key);
            }
            old.terminal |= terminal;
            segs.set_live(was, false);
            if ended {
                self.feed_entry(c, true);
            }
        } else {
            self.feed_entry(c, false);
            if terminal {
                self.feed_entry(c, true);
            }
            let tenant_key: Box<[u8]> = tenant_key(&c.tenant_id, c.submitted_ms, &c.id).into();
            self.by_tenant.insert(tenant_key.clone());
            let pending_key: Box<[u8]> = if terminal {
                Box::default()
            } else {
                self.pending
                    .insert(c.pending_key.clone().into_boxed_slice(), c.id.clone());
                c.pending_key.clone().into_boxed_slice()
            };
            self.by_id.insert(
                c.id.clone(),
                Slot {
                    at,
                    terminal,
                    tenant_key,
                    pending_key,
                },
            );
        }
        segs.set_live(at, true);
    }

    /// `c`'s `commands` entry (numbered by its queue key), or its `results` one (numbered by
    /// `ended_seq`; a command ended by a version before the command log has none here: its
    /// entry is in sled's feed tree).
    fn feed_entry(&mut self, c: &Command, results: bool) {
        let seq = if results {
            c.ended_seq
        } else {
            c.pending_key
                .len()
                .checked_sub(8)
                .and_then(|at| <[u8; 8]>::try_from(&c.pending_key[at..]).ok())
                .map(u64::from_be_bytes)
        };
        let Some(seq) = seq else {
            return;
        };
        let entry = FeedRef {
            results,
            at_ms: if results {
                c.completed_ms.unwrap_or(c.submitted_ms)
            } else {
                c.submitted_ms
            },
            id: c.id.as_str().into(),
        };
        match self.feed.get_mut(c.tenant_id.as_str()) {
            Some(t) => {
                t.insert(seq, entry);
            }
            None => {
                self.feed
                    .insert(c.tenant_id.as_str().into(), BTreeMap::from([(seq, entry)]));
            }
        }
    }

    fn forget(&mut self, segs: &mut Segments, id: &str) {
        let Some(s) = self.by_id.remove(id) else {
            return;
        };
        self.by_tenant.remove(&s.tenant_key);
        if !s.terminal {
            self.pending.remove(&s.pending_key);
        }
        segs.set_live(s.at, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcg_durable::seglog::segment_name;
    /// A frame's header: length and checksum.
    const HEADER: usize = 8;
    use crate::store::{CommandResult, CommandState};

    fn cmd(id: &str, tenant: &str, at: i64, seq: u64) -> Command {
        let mut c = Command::queued(
            id.into(),
            tenant,
            "gw_1",
            "test.echo".into(),
            serde_json::json!({"n": seq}),
            at,
        );
        c.pending_key = crate::store::Store::pending_key("gw_1", seq);
        c
    }

    fn ended(mut c: Command) -> Command {
        let r = CommandResult {
            ok: true,
            output: serde_json::json!({"done": true}),
            error_class: String::new(),
            error_message: String::new(),
            started_ms: c.submitted_ms,
            finished_ms: c.submitted_ms + 1,
        };
        c.state = CommandState::of_result(&r);
        c.result = Some(r);
        c.completed_ms = Some(c.submitted_ms + 1);
        c
    }

    #[test]
    fn records_indexes_and_forgetting_survive_reopening() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let log = CmdLog::open(dir.path()).expect("open");
            for i in 0..10u64 {
                log.put(&cmd(&format!("c_{i}"), "tn_1", 1_000 + i as i64, i))
                    .expect("put");
            }
            log.put(&ended(cmd("c_3", "tn_1", 1_003, 3))).expect("end");
            log.put(&ended(cmd("c_4", "tn_1", 1_004, 4))).expect("end");
            // Only ended commands older than the cutoff go: c_3; c_4 is newer, c_0..c_2 pending.
            let gone = log.prune(&["tn_1".into()], 1_004).expect("prune");
            assert_eq!(gone, vec!["c_3".to_string()]);
            log.sync().expect("sync");
        }
        let log = CmdLog::open(dir.path()).expect("reopen");
        assert_eq!(log.count(), 9);
        assert!(log.get("c_3").expect("read").is_none());
        let c4 = log.get("c_4").expect("read").expect("kept");
        assert_eq!(c4.state, CommandState::Succeeded);
        assert_eq!(c4.payload, serde_json::json!({"n": 4}));
        let pending: Vec<String> = log
            .pending()
            .expect("pending")
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(
            pending,
            ["c_0", "c_1", "c_2", "c_5", "c_6", "c_7", "c_8", "c_9"]
        );
        let newest: Vec<String> = log.tenant_ids("tn_1").take(3).collect();
        assert_eq!(newest, ["c_9", "c_8", "c_7"]);
        assert_eq!(log.tenant_ids("tn_1").count(), 9);
        assert_eq!(
            log.tenant_ids("tn_").count(),
            0,
            "a tenant's prefix is not another's"
        );
    }

    #[test]
    fn a_record_cut_short_at_the_end_is_cut_off_and_one_inside_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let log = CmdLog::open(dir.path()).expect("open");
            log.put(&cmd("c_1", "tn_1", 1, 1)).expect("put");
            log.put(&cmd("c_2", "tn_1", 2, 2)).expect("put");
            log.sync().expect("sync");
        }
        let seg = dir.path().join(segment_name(1));
        let full = std::fs::metadata(&seg).expect("meta").len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .expect("open")
            .set_len(full - 5)
            .expect("cut");
        {
            let log = CmdLog::open(dir.path()).expect("a torn tail is cut off");
            assert!(log.get("c_1").expect("read").is_some());
            assert!(log.get("c_2").expect("read").is_none());
            log.put(&cmd("c_3", "tn_1", 3, 3))
                .expect("appends after the cut");
            log.put(&cmd("c_4", "tn_1", 4, 4)).expect("put");
            log.sync().expect("sync");
        }
        let log = CmdLog::open(dir.path()).expect("reopen");
        assert_eq!(log.count(), 3);
        drop(log);

        // Zeros where the file grew (its size reached the disk, its data did not): cut off.
        let good = std::fs::metadata(&seg).expect("meta").len();
        let mut bytes = std::fs::read(&seg).expect("read");
        bytes.extend_from_slice(&[0u8; 100]);
        std::fs::write(&seg, &bytes).expect("zeros");
        assert_eq!(CmdLog::open(dir.path()).expect("zeros cut off").count(), 3);
        assert_eq!(std::fs::metadata(&seg).expect("meta").len(), good);

        // A damaged record with good ones after it, even in the last segment: refused.
        let mut bytes = std::fs::read(&seg).expect("read");
        let first = u32::from_le_bytes(bytes[..4].try_into().expect("4")) as usize;
        bytes[HEADER + first + HEADER + 2] ^= 0xff; // the second record's payload
        std::fs::write(&seg, &bytes).expect("damage");
        let msg = CmdLog::open(dir.path()).err().expect("refused").to_string();
        assert!(
            msg.contains("checksum") && msg.contains("truncate -s"),
            "{msg}"
        );
        bytes[HEADER + first + HEADER + 2] ^= 0xff;
        std::fs::write(&seg, &bytes).expect("mend");

        // Damage inside a segment that is not the last: refused, naming the file.
        std::fs::write(dir.path().join(segment_name(2)), b"").expect("a later segment");
        let mut bytes = std::fs::read(&seg).expect("read");
        bytes[HEADER + 2] ^= 0xff;
        std::fs::write(&seg, &bytes).expect("damage");
        let e = CmdLog::open(dir.path()).err().expect("refused");
        let msg = e.to_string();
        assert!(
            msg.contains("00000001.log") && msg.contains("checksum"),
            "{msg}"
        );
    }

    #[test]
    fn old_segments_go_once_nothing_in_them_is_live_and_live_records_are_copied_forward() {
        let dir = tempfile::tempdir().expect("dir");
        let log = CmdLog::open_sized(dir.path(), 4096).expect("open");
        // One that stays pending from the first segment, then many that end (a sync after
        // each, as the store's flushes do: a sync closes a full segment).
        log.put(&cmd("c_keep", "tn_1", 1, 0)).expect("put");
        for i in 1..200u64 {
            let c = cmd(&format!("c_{i}"), "tn_1", 1 + i as i64, i);
            log.put(&c).expect("put");
            log.put(&ended(c)).expect("end");
            log.sync().expect("sync");
        }
        let before = log.segments();
        assert!(before > 10, "{before} segments");
        let gone = log.prune(&["tn_1".into()], 10_000).expect("prune");
        assert_eq!(gone.len(), 199);
        assert!(log.segments() <= 2, "{} segments left", log.segments());
        assert!(
            dir.path().join(segment_name(1)).metadata().is_err(),
            "the first segment is deleted"
        );
        assert_eq!(log.pending().expect("pending").len(), 1);
        drop(log);
        let log = CmdLog::open_sized(dir.path(), 4096).expect("reopen");
        assert_eq!(log.count(), 1);
        assert_eq!(
            log.get("c_keep").expect("read").expect("kept").state,
            CommandState::Queued
        );
        assert!(
            log.get("c_5").expect("read").is_none(),
            "a forgotten command stays forgotten"
        );
    }

    #[test]
    fn a_commands_feed_entries_are_its_submit_and_its_end_until_the_feeds_retention() {
        let dir = tempfile::tempdir().expect("dir");
        let seqs = |v: Vec<Entry>| -> Vec<(u64, Topic, String)> {
            v.into_iter()
                .map(|e| {
                    (
                        e.seq,
                        e.topic,
                        String::from_utf8_lossy(&e.reference).into_owned(),
                    )
                })
                .collect()
        };
        {
            let log = CmdLog::open(dir.path()).expect("open");
            log.put(&cmd("c_1", "tn_1", 100, 1)).expect("put");
            log.put(&cmd("c_2", "tn_1", 200, 2)).expect("put");
            log.put(&cmd("c_9", "tn_2", 200, 3))
                .expect("another tenant's");
            let mut end = ended(cmd("c_1", "tn_1", 100, 1));
            end.ended_seq = Some(4);
            log.put(&end).expect("end");
            assert_eq!(
                seqs(log.feed_read("tn_1", 0, 10, 10)),
                [
                    (1, Topic::Commands, "c_1".into()),
                    (2, Topic::Commands, "c_2".into()),
                    (4, Topic::Results, "c_1".into())
                ]
            );
            assert_eq!(
                seqs(log.feed_read("tn_1", 1, 3, 10)),
                [(2, Topic::Commands, "c_2".into())]
            );
            assert_eq!(log.feed_read("tn_1", 0, 10, 1).len(), 1);
            log.sync().expect("sync");
        }
        let log = CmdLog::open(dir.path()).expect("reopen");
        assert_eq!(
            log.feed_read("tn_1", 0, 10, 10).len(),
            3,
            "rebuilt from the records"
        );
        // The feed's retention: c_1's entries (submitted at 100, ended at 101) go.
        assert_eq!(log.feed_older_than(150), [("tn_1".to_string(), 4)]);
        assert_eq!(log.prune_feed(150), 2);
        assert!(log.feed_older_than(150).is_empty());
        assert_eq!(
            seqs(log.feed_read("tn_1", 0, 10, 10)),
            [(2, Topic::Commands, "c_2".into())]
        );
        assert!(
            log.get("c_1").expect("read").is_some(),
            "the command itself stays"
        );
    }

    #[test]
    fn a_record_that_has_not_ended_does_not_replace_one_that_has() {
        let dir = tempfile::tempdir().expect("dir");
        let log = CmdLog::open(dir.path()).expect("open");
        let c = cmd("c_1", "tn_1", 1, 1);
        assert!(log.put(&c).expect("put"));
        assert!(log.put(&ended(c.clone())).expect("end"));
        let mut late = c;
        late.state = CommandState::Delivered;
        assert!(!log.put(&late).expect("refused"));
        assert_eq!(
            log.get("c_1").expect("read").expect("held").state,
            CommandState::Succeeded
        );
        assert!(log.pending().expect("pending").is_empty());
    }
}
