//! Commands as an append-only log, their indexes in memory.
//!
//! Every change to a command appends its whole record (`put`) to the log's current segment;
//! retention appends the ids it drops (`forget`). Nothing is rewritten in place. Memory holds,
//! per command, where its latest record is, the keys of its two indexes (a tenant's commands
//! newest first; the commands still waiting for a result, in the order they were queued) and
//! its entries in its tenant's feed: about 400 bytes, not the record. Opening the log reads
//! every segment once to rebuild them.
//!
//! Why not sled, as the rest of the store: a command touched eight sled keys on one node (its
//! record twice, the pending and tenant indexes, two feed entries, the lookups), and sled's cost
//! per key (walking its tree, splitting nodes, rewriting pages, writing them out) was the
//! largest single share of pcg-saas's CPU per command (BENCHMARKS.md, "Commands as an
//! append-only log").
//!
//! On disk: `cmdlog/NNNNNNNN.log` segments of about [`SEGMENT_BYTES`] each, a frame per record:
//! its length (u32, little endian), the CRC-32 of its payload (u32), the payload (JSON).
//!
//! Appends stay in memory (the current segment's tail) until [`CmdLog::sync`], which the
//! store's group commit calls after sled's flush: what sled holds that a command depends on (an
//! idempotency key's claim) is never behind the command. A sync writes the tail, syncs the file,
//! and closes the segment once it is full: the next one is created only after it is synced, so
//! only the last segment can end in a write a power loss interrupted. Such an end (a record cut
//! short, or zeros where the file grew) is cut off when the log opens; a damaged record anywhere
//! else is an error that names the file and the offset. A sync that fails leaves the log
//! refusing every later sync: what the kernel dropped after a failed `fdatasync` cannot be told
//! apart from what it kept.
//!
//! Segments are deleted from the oldest only, so a `forget` is never deleted before the records
//! it forgets, and never before everything written is synced: the oldest segment goes once
//! nothing in it is live; when no more than a quarter of its records are live (commands still
//! pending or kept by retention), or the whole log holds more than twice what is live, its live
//! records are copied forward first.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::feed::{Entry, Topic};
use super::{Command, StoreError};

/// Size past which a sync closes the segment and begins the next.
pub const SEGMENT_BYTES: u64 = 64 << 20;
const HEADER: usize = 8;
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
    seg: u32,
    off: u64,
    len: u32,
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

struct Segment {
    file: Arc<File>,
    path: PathBuf,
    /// Bytes appended (the current segment's include its tail).
    len: u64,
    /// Records in it; how many of them are their command's latest, and their bytes.
    records: u64,
    live: u64,
    live_bytes: u64,
}

struct Inner {
    by_id: HashMap<String, Slot>,
    by_tenant: BTreeSet<Box<[u8]>>,
    pending: BTreeMap<Box<[u8]>, String>,
    /// Per tenant, the feed entries of its commands by sequence number (kept until the feed's
    /// retention drops them: [`CmdLog::prune_feed`]).
    feed: HashMap<Box<str>, BTreeMap<u64, FeedRef>>,
    segments: BTreeMap<u32, Segment>,
    current: u32,
    /// A new segment's directory entry not yet made durable.
    dir_unsynced: bool,
    /// Appends so far, and how many of them the last sync covered.
    appended: u64,
    synced: u64,
    /// The current segment's bytes not yet written to its file, and how many its file holds.
    tail: Vec<u8>,
    on_file: u64,
    /// Set by a sync that failed: every later one refuses.
    failed: Option<String>,
}

/// The commands' log (one per store).
pub struct CmdLog {
    dir: PathBuf,
    segment_bytes: u64,
    inner: Mutex<Inner>,
    syncing: Mutex<()>,
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Log {
        action,
        path,
        source,
    }
}

fn corrupt(path: &Path, off: u64, what: &str) -> StoreError {
    StoreError::Corrupt {
        tree: "commands",
        message: format!(
            "{}: {what} at byte {off}; restore the data directory from a backup, or cut the file there (truncate -s {off} FILE) to start without the records after it",
            path.display()
        ),
    }
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

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(HEADER + payload.len());
    f.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    f.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

fn segment_name(n: u32) -> String {
    format!("{n:08}.log")
}

/// What is wrong with the frame at `off` of `bytes`, if anything, and whether it is the end a
/// write a power loss interrupted leaves (the frame runs past the end of the file, or
/// everything from it on is zeros: a file that grew before its data was written).
fn damage(bytes: &[u8], off: usize) -> Option<(&'static str, bool)> {
    let Some(head) = bytes.get(off..off + HEADER) else {
        return Some(("a record cut short", true));
    };
    let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
    if len == 0 {
        // No record is empty; zeros pass the checksum (an empty payload's is 0).
        return Some(("an empty record", bytes[off..].iter().all(|b| *b == 0)));
    }
    let Some(payload) = bytes.get(off + HEADER..off + HEADER + len) else {
        return Some(("a record cut short", true));
    };
    if crc32fast::hash(payload) != crc {
        let torn = bytes[off..].iter().all(|b| *b == 0);
        return Some(("a damaged record (checksum)", torn));
    }
    None
}

impl CmdLog {
    /// Opens the log in `dir` (made if missing, owner-only) and rebuilds its indexes.
    pub fn open(dir: &Path) -> Result<CmdLog, StoreError> {
        Self::open_sized(dir, SEGMENT_BYTES)
    }

    pub(crate) fn open_sized(dir: &Path, segment_bytes: u64) -> Result<CmdLog, StoreError> {
        pcg_durable::fs::private_dir(dir).map_err(io_err("create", dir))?;
        let mut numbers = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_err("read", dir))? {
            let entry = entry.map_err(io_err("read", dir))?;
            let name = entry.file_name();
            let Some(n) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".log"))
                .filter(|n| n.len() == 8)
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            numbers.push(n);
        }
        numbers.sort_unstable();
        let mut inner = Inner {
            by_id: HashMap::new(),
            by_tenant: BTreeSet::new(),
            pending: BTreeMap::new(),
            feed: HashMap::new(),
            segments: BTreeMap::new(),
            current: 0,
            dir_unsynced: false,
            appended: 0,
            synced: 0,
            tail: Vec::new(),
            on_file: 0,
            failed: None,
        };
        let last = numbers.last().copied();
        for n in numbers {
            let path = dir.join(segment_name(n));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io_err("open", &path))?;
            let bytes = std::fs::read(&path).map_err(io_err("read", &path))?;
            inner.segments.insert(n, Segment::new(file, path.clone()));
            let mut off = 0usize;
            while off < bytes.len() {
                if let Some((what, torn)) = damage(&bytes, off) {
                    if !torn || Some(n) != last {
                        return Err(corrupt(&path, off as u64, what));
                    }
                    tracing::warn!(
                        path = %path.display(),
                        offset = off,
                        "the command log ends in {what}, a write a stop interrupted before it was durable: cut off there"
                    );
                    let seg = inner.segment(n);
                    seg.file
                        .set_len(off as u64)
                        .and_then(|_| seg.file.sync_data())
                        .map_err(io_err("truncate", &path))?;
                    break;
                }
                let len = u32::from_le_bytes(bytes[off..off + 4].try_into().expect("4 bytes"));
                let payload = &bytes[off + HEADER..off + HEADER + len as usize];
                match serde_json::from_slice::<Rec>(payload) {
                    Ok(Rec::Put(c)) => inner.index(&c, n, off as u64, len),
                    Ok(Rec::Forget(ids)) => {
                        for id in ids {
                            inner.forget(&id);
                        }
                    }
                    Err(_) => return Err(corrupt(&path, off as u64, "an unreadable record")),
                }
                inner.segment(n).records += 1;
                off += HEADER + len as usize;
            }
            inner.segment(n).len = off as u64;
            inner.current = n;
            inner.on_file = off as u64;
        }
        if last.is_none() {
            let path = dir.join(segment_name(1));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(io_err("create", &path))?;
            inner.segments.insert(1, Segment::new(file, path));
            inner.current = 1;
            inner.dir_unsynced = true;
        }
        Ok(CmdLog {
            dir: dir.to_path_buf(),
            segment_bytes,
            inner: Mutex::new(inner),
            syncing: Mutex::new(()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .expect("the command log's lock is never poisoned")
    }

    /// Closes the current segment once it is full: syncs it (with what was appended since the
    /// sync that found it full), then begins the next. A failure leaves the current segment
    /// open, to be closed by a later sync.
    fn rotate_if_full(&self, inner: &mut Inner) -> Result<(), StoreError> {
        let n = inner.current;
        if inner.segment(n).len < self.segment_bytes {
            return Ok(());
        }
        Self::write_out(inner)?;
        let seg = inner.segment(n);
        seg.file.sync_data().map_err(io_err("sync", &seg.path))?;
        let path = self.dir.join(segment_name(n + 1));
        // Nothing else makes files with numbers past the current one: one left by a rotation
        // that failed part way holds nothing.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_err("create", &path))?;
        inner.segments.insert(n + 1, Segment::new(file, path));
        inner.current = n + 1;
        inner.on_file = 0;
        inner.dir_unsynced = true;
        Ok(())
    }

    /// Writes the current segment's tail to its file. A write that fails part way is written
    /// over by the next attempt, which starts where the file's good bytes end.
    fn write_out(inner: &mut Inner) -> Result<(), StoreError> {
        if inner.tail.is_empty() {
            return Ok(());
        }
        let n = inner.current;
        let at = inner.on_file;
        let seg = inner.segments.get(&n).expect("the current segment is open");
        seg.file
            .write_all_at(&inner.tail, at)
            .map_err(io_err("write", &seg.path))?;
        inner.on_file += inner.tail.len() as u64;
        inner.tail.clear();
        Ok(())
    }

    /// Appends a framed payload to the current segment's tail; returns where it went.
    fn append(inner: &mut Inner, framed: &[u8]) -> (u32, u64) {
        let n = inner.current;
        let seg = inner.segment(n);
        let off = seg.len;
        seg.len += framed.len() as u64;
        seg.records += 1;
        inner.tail.extend_from_slice(framed);
        inner.appended += 1;
        (n, off)
    }

    /// Writes `c` as its command's latest record (not yet written to disk: [`CmdLog::sync`]).
    /// A record that has not ended does not replace one that has: returns whether it was
    /// written.
    pub fn put(&self, c: &Command) -> Result<bool, StoreError> {
        let payload = serde_json::to_vec(&RecRef::Put(c)).expect("records serialise");
        let framed = frame(&payload);
        let mut inner = self.lock();
        if !c.state.is_terminal() && inner.by_id.get(&c.id).is_some_and(|s| s.terminal) {
            return Ok(false);
        }
        let (seg, off) = Self::append(&mut inner, &framed);
        inner.index(c, seg, off, payload.len() as u32);
        Ok(true)
    }

    /// Whether a record of `id` is held.
    pub fn contains(&self, id: &str) -> bool {
        self.lock().by_id.contains_key(id)
    }

    /// Whether `id` is held and has not ended.
    pub fn is_pending(&self, id: &str) -> bool {
        self.lock().by_id.get(id).is_some_and(|s| !s.terminal)
    }

    /// Commands held (ended or not).
    pub fn count(&self) -> usize {
        self.lock().by_id.len()
    }

    /// `id`'s latest record.
    pub fn get(&self, id: &str) -> Result<Option<Command>, StoreError> {
        let (file, path, off, len) = {
            let inner = self.lock();
            let Some(s) = inner.by_id.get(id) else {
                return Ok(None);
            };
            let seg = inner
                .segments
                .get(&s.seg)
                .expect("a slot's segment is open");
            if s.seg == inner.current && s.off >= inner.on_file {
                // Still in the tail.
                let from = (s.off - inner.on_file) as usize;
                let payload = inner.tail[from + HEADER..from + HEADER + s.len as usize].to_vec();
                let (path, off) = (seg.path.clone(), s.off);
                drop(inner);
                return Self::decode(&payload, &path, off).map(Some);
            }
            (seg.file.clone(), seg.path.clone(), s.off, s.len)
        };
        let framed = Self::read_raw(&file, &path, off, len)?;
        Self::decode(&framed[HEADER..], &path, off).map(Some)
    }

    fn read_raw(file: &File, path: &Path, off: u64, len: u32) -> Result<Vec<u8>, StoreError> {
        let mut buf = vec![0u8; HEADER + len as usize];
        file.read_exact_at(&mut buf, off)
            .map_err(io_err("read", path))?;
        let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
        if crc32fast::hash(&buf[HEADER..]) != crc {
            return Err(corrupt(path, off, "a damaged record (checksum)"));
        }
        Ok(buf)
    }

    fn decode(payload: &[u8], path: &Path, off: u64) -> Result<Command, StoreError> {
        match serde_json::from_slice::<Rec>(payload) {
            Ok(Rec::Put(c)) => Ok(*c),
            _ => Err(corrupt(path, off, "not a command's record")),
        }
    }

    /// Every command still waiting for a result, in the order they were queued.
    pub fn pending(&self) -> Result<Vec<Command>, StoreError> {
        let ids: Vec<String> = self.lock().pending.values().cloned().collect();
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
                .lock()
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
            let inner = self.lock();
            for t in tenants {
                let at_of = t.len() + 1;
                // Oldest first: the index runs newest first.
                for k in inner.by_tenant.range(Self::tenant_range(t)).rev() {
                    let at = k
                        .get(at_of..at_of + 8)
                        .and_then(|b| <[u8; 8]>::try_from(b).ok())
                        .map(|b| u64::MAX - u64::from_be_bytes(b))
                        .unwrap_or(u64::MAX);
                    if i64::try_from(at).unwrap_or(i64::MAX) >= cutoff_ms {
                        break;
                    }
                    let id = String::from_utf8_lossy(&k[(at_of + 9).min(k.len())..]).into_owned();
                    if inner.by_id.get(&id).is_some_and(|s| s.terminal) {
                        gone.push(id);
                    }
                }
            }
        }
        for chunk in gone.chunks(FORGET_CHUNK) {
            let payload = serde_json::to_vec(&RecRef::Forget(chunk)).expect("records serialise");
            let framed = frame(&payload);
            let mut inner = self.lock();
            Self::append(&mut inner, &framed);
            for id in chunk {
                inner.forget(id);
            }
        }
        self.compact()?;
        Ok(gone)
    }

    /// Deletes the oldest segments that hold nothing live, copying forward what little is.
    /// Nothing is deleted before everything written so far is durable: the records that made a
    /// deleted one stale (a command's end, its forgetting) must not be lost with it.
    pub fn compact(&self) -> Result<usize, StoreError> {
        let mut deleted = 0;
        loop {
            let head = {
                let mut inner = self.lock();
                let Some((&head, seg)) = inner.segments.first_key_value() else {
                    break;
                };
                if head == inner.current {
                    break;
                }
                let (live, records) = (seg.live, seg.records);
                let (file, path) = (seg.file.clone(), seg.path.clone());
                if live > 0 {
                    let (all, all_live) = inner
                        .segments
                        .values()
                        .fold((0, 0), |(a, l), s| (a + s.len, l + s.live_bytes));
                    if live * 4 > records && all_live * 2 >= all {
                        break;
                    }
                    let moving: Vec<(String, u64, u32)> = inner
                        .by_id
                        .iter()
                        .filter(|(_, s)| s.seg == head)
                        .map(|(id, s)| (id.clone(), s.off, s.len))
                        .collect();
                    for (id, off, len) in moving {
                        let framed = Self::read_raw(&file, &path, off, len)?;
                        let (to, at) = Self::append(&mut inner, &framed);
                        inner.moved(&id, to, at);
                    }
                }
                head
            };
            self.sync()?;
            let mut inner = self.lock();
            // Only the current segment takes records: a closed one's live count cannot grow.
            if inner.segments.first_key_value().map(|(&n, s)| (n, s.live)) != Some((head, 0))
                || head == inner.current
            {
                break;
            }
            let seg = inner.segments.remove(&head).expect("the head segment");
            std::fs::remove_file(&seg.path).map_err(io_err("delete", &seg.path))?;
            inner.dir_unsynced = true;
            deleted += 1;
        }
        if deleted > 0 {
            self.sync()?;
        }
        Ok(deleted)
    }

    /// Makes everything appended before this call durable.
    pub fn sync(&self) -> Result<(), StoreError> {
        // One at a time: a sync that finds nothing to do must not return while another one is
        // still making the same appends durable.
        let _one = self
            .syncing
            .lock()
            .expect("the sync lock is never poisoned");
        let (file, path, dir, upto) = {
            let mut inner = self.lock();
            if let Some(why) = &inner.failed {
                return Err(StoreError::Log {
                    action: "sync",
                    path: self.dir.clone(),
                    source: std::io::Error::other(format!(
                        "an earlier sync failed ({why}), and what it held cannot be known to be on disk; restart pcg-saas"
                    )),
                });
            }
            if inner.appended == inner.synced && !inner.dir_unsynced {
                return Ok(()); // nothing appended since the last sync
            }
            let upto = inner.appended;
            Self::write_out(&mut inner)?;
            let n = inner.current;
            let dir = std::mem::take(&mut inner.dir_unsynced);
            let seg = inner.segments.get(&n).expect("the current segment");
            (seg.file.clone(), seg.path.clone(), dir, upto)
        };
        let mut done = file.sync_data().map_err(io_err("sync", &path));
        if done.is_ok() && dir {
            done = File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("sync", &self.dir));
        }
        let mut inner = self.lock();
        if let Err(e) = done {
            inner.failed = Some(e.to_string());
            return Err(e);
        }
        inner.synced = inner.synced.max(upto);
        if let Err(e) = self.rotate_if_full(&mut inner) {
            // The sync itself is done; the segment is closed by a later one.
            tracing::warn!("cannot begin the command log's next segment: {e}");
        }
        Ok(())
    }

    /// `tenant_id`'s commands' feed entries after `after` up to `upto`, oldest first, at most
    /// `limit`.
    pub fn feed_read(&self, tenant_id: &str, after: u64, upto: u64, limit: usize) -> Vec<Entry> {
        if after >= upto {
            return Vec::new();
        }
        let inner = self.lock();
        let Some(t) = inner.feed.get(tenant_id) else {
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
        let inner = self.lock();
        inner
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
        let mut inner = self.lock();
        let mut n = 0;
        inner.feed.retain(|_, entries| {
            let before = entries.len();
            entries.retain(|_, f| f.at_ms >= cutoff_ms);
            n += before - entries.len();
            !entries.is_empty()
        });
        n
    }

    /// Segment files on disk (for tests and the size of the data directory).
    pub fn segments(&self) -> usize {
        self.lock().segments.len()
    }
}

impl Segment {
    /// A segment's bookkeeping before any of its records is counted.
    fn new(file: File, path: PathBuf) -> Segment {
        Segment {
            file: Arc::new(file),
            path,
            len: 0,
            records: 0,
            live: 0,
            live_bytes: 0,
        }
    }
}

impl Inner {
    fn segment(&mut self, n: u32) -> &mut Segment {
        self.segments.get_mut(&n).expect("an open segment")
    }

    /// A record of `len` bytes at segment `seg` stops or starts being its command's latest.
    fn count_live(&mut self, seg: u32, len: u32, live: bool) {
        if let Some(s) = self.segments.get_mut(&seg) {
            let bytes = HEADER as u64 + u64::from(len);
            if live {
                s.live += 1;
                s.live_bytes += bytes;
            } else {
                s.live = s.live.saturating_sub(1);
                s.live_bytes = s.live_bytes.saturating_sub(bytes);
            }
        }
    }

    /// Records that `c`'s latest record is `len` bytes at `off` of segment `seg`.
    fn index(&mut self, c: &Command, seg: u32, off: u64, len: u32) {
        let terminal = c.state.is_terminal();
        if let Some(old) = self.by_id.get_mut(&c.id) {
            let (was, was_len) = (old.seg, old.len);
            old.seg = seg;
            old.off = off;
            old.len = len;
            let ended = terminal && !old.terminal;
            if ended {
                let key = std::mem::take(&mut old.pending_key);
                self.pending.remove(&key);
            }
            old.terminal |= terminal;
            self.count_live(was, was_len, false);
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
                    seg,
                    off,
                    len,
                    terminal,
                    tenant_key,
                    pending_key,
                },
            );
        }
        self.count_live(seg, len, true);
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

    /// `id`'s record copied forward to `seg` at `off` (same length).
    fn moved(&mut self, id: &str, seg: u32, off: u64) {
        let Some(s) = self.by_id.get_mut(id) else {
            return;
        };
        let (was, len) = (s.seg, s.len);
        s.seg = seg;
        s.off = off;
        self.count_live(was, len, false);
        self.count_live(seg, len, true);
    }

    fn forget(&mut self, id: &str) {
        let Some(s) = self.by_id.remove(id) else {
            return;
        };
        self.by_tenant.remove(&s.tenant_key);
        if !s.terminal {
            self.pending.remove(&s.pending_key);
        }
        self.count_live(s.seg, s.len, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
