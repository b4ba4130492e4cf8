//! An append-only log of records in segment files, indexed in memory by its owner.
//!
//! The log knows frames, segments and which records are live; what a record means, and where
//! the latest record of each thing is, is the owner's [`Index`], kept under the same lock as
//! the segments so that an append and its index update are one step. Opening the log reads
//! every segment once and hands each record to the index ([`Index::replay`]).
//!
//! On disk: `NNNNNNNN.log` segments of about `segment_bytes` each, a frame per record: its
//! length (u32, little endian), the CRC-32 of its payload (u32), the payload.
//!
//! Appends stay in memory (the current segment's tail) until [`Log::sync`], which writes the
//! tail, syncs the file (`fdatasync`), and closes the segment once it is full: the next one is
//! created only after it is synced, so only the last segment can end in a write a power loss
//! interrupted. Such an end (a record cut short, or zeros where the file grew) is cut off when
//! the log opens; a damaged record anywhere else is an error that names the file and the
//! offset. A sync that fails leaves the log refusing every later sync: what the kernel dropped
//! after a failed `fdatasync` cannot be told apart from what it kept.
//!
//! Segments are deleted from the oldest only ([`Log::compact`]), so a record that makes others
//! stale is never deleted before them, and never before everything written is synced: the
//! oldest segment goes once nothing in it is live; when no more than a quarter of its records
//! are live, or the whole log holds more than twice what is live, its live records are copied
//! forward first.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Size past which a sync closes the segment and begins the next.
pub const SEGMENT_BYTES: u64 = 64 << 20;
const HEADER: usize = 8;

/// Where a record is: its segment, the offset of its frame, its payload's length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    pub seg: u32,
    pub off: u64,
    pub len: u32,
}

/// What went wrong with a log; cheap to clone (a group commit answers every waiter with it).
#[derive(Clone, Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot {action} {}: {source}; check the data directory's disk space and permissions", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: Arc<std::io::Error>,
    },
    #[error("{}: {what} at byte {off}; restore the data directory from a backup, or cut the file there (truncate -s {off} FILE) to start without the records after it", path.display())]
    Corrupt {
        path: PathBuf,
        off: u64,
        what: String,
    },
    #[error("cannot sync {}: an earlier sync failed ({why}), and what it held cannot be known to be on disk; restart {service}", path.display())]
    Failed {
        path: PathBuf,
        why: String,
        service: &'static str,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LogError {
    let path = path.to_path_buf();
    move |source| LogError::Io {
        action,
        path,
        source: Arc::new(source),
    }
}

/// The owner's view of the records: what each means and which are live.
pub trait Index {
    /// What names a live record (for copying it forward).
    type Key;
    /// A record read at open, in log order. Marks what it makes live or stale with
    /// [`Segments::set_live`]; an error (the payload does not decode) is reported as damage at
    /// `at`.
    fn replay(&mut self, segs: &mut Segments, at: Loc, payload: &[u8]) -> Result<(), String>;
    /// The live records in segment `seg`.
    fn live_in(&self, seg: u32) -> Vec<(Self::Key, Loc)>;
    /// `key`'s record was copied forward to `to` (the log moves the live count).
    fn moved(&mut self, key: &Self::Key, to: Loc);
}

struct Segment {
    file: Arc<File>,
    path: PathBuf,
    /// Bytes appended (the current segment's include its tail).
    len: u64,
    /// Records in it; how many of them are live, and their bytes.
    records: u64,
    live: u64,
    live_bytes: u64,
}

impl Segment {
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

/// The segments and the tail not yet written: what an owner appends to under the log's lock.
pub struct Segments {
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

/// A record to read outside the log's lock ([`Segments::reader`]).
pub enum Reader {
    /// Still in the tail: its payload.
    Tail(Vec<u8>),
    File {
        file: Arc<File>,
        path: PathBuf,
        at: Loc,
    },
}

impl Reader {
    /// The record's payload (its checksum checked when it comes from the file).
    pub fn read(self) -> Result<Vec<u8>, LogError> {
        match self {
            Reader::Tail(p) => Ok(p),
            Reader::File { file, path, at } => {
                let mut framed = read_raw(&file, &path, at)?;
                framed.drain(..HEADER);
                Ok(framed)
            }
        }
    }
}

impl Segments {
    fn segment(&mut self, n: u32) -> &mut Segment {
        self.segments.get_mut(&n).expect("an open segment")
    }

    /// Appends `payload` (framed) to the current segment's tail: durable after the next
    /// [`Log::sync`]. Not live until [`set_live`](Self::set_live) says so.
    pub fn append(&mut self, payload: &[u8]) -> Loc {
        let len = u32::try_from(payload.len()).expect("a record under 4 GiB");
        self.append_framed(&frame(payload), len)
    }

    fn append_framed(&mut self, framed: &[u8], len: u32) -> Loc {
        let n = self.current;
        let seg = self.segment(n);
        let off = seg.len;
        seg.len += framed.len() as u64;
        seg.records += 1;
        self.tail.extend_from_slice(framed);
        self.appended += 1;
        Loc { seg: n, off, len }
    }

    /// The record at `at` starts (`true`) or stops being live: the latest of what it records.
    pub fn set_live(&mut self, at: Loc, live: bool) {
        if let Some(s) = self.segments.get_mut(&at.seg) {
            let bytes = HEADER as u64 + u64::from(at.len);
            if live {
                s.live += 1;
                s.live_bytes += bytes;
            } else {
                s.live = s.live.saturating_sub(1);
                s.live_bytes = s.live_bytes.saturating_sub(bytes);
            }
        }
    }

    /// What reads the record at `at` (from the tail now, or from its file once the lock is let
    /// go: a segment deleted meanwhile stays readable through the open file).
    pub fn reader(&self, at: Loc) -> Reader {
        let seg = self
            .segments
            .get(&at.seg)
            .expect("a record's segment is open");
        if at.seg == self.current && at.off >= self.on_file {
            let from = (at.off - self.on_file) as usize + HEADER;
            return Reader::Tail(self.tail[from..from + at.len as usize].to_vec());
        }
        Reader::File {
            file: seg.file.clone(),
            path: seg.path.clone(),
            at,
        }
    }

    /// Segment files on disk.
    pub fn count(&self) -> usize {
        self.segments.len()
    }

    /// Writes the current segment's tail to its file. A write that fails part way is written
    /// over by the next attempt, which starts where the file's good bytes end.
    fn write_out(&mut self) -> Result<(), LogError> {
        if self.tail.is_empty() {
            return Ok(());
        }
        let seg = self
            .segments
            .get(&self.current)
            .expect("the current segment");
        seg.file
            .write_all_at(&self.tail, self.on_file)
            .map_err(io_err("write", &seg.path))?;
        self.on_file += self.tail.len() as u64;
        self.tail.clear();
        Ok(())
    }
}

/// The state under the log's lock: its segments and the owner's index.
pub struct State<I> {
    pub segs: Segments,
    pub index: I,
}

/// An append-only log in a directory of its own.
pub struct Log<I> {
    dir: PathBuf,
    segment_bytes: u64,
    /// Named in the error of a sync after a failed one: what to restart.
    service: &'static str,
    inner: Mutex<State<I>>,
    syncing: Mutex<()>,
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

/// The file name of segment `n`.
pub fn segment_name(n: u32) -> String {
    format!("{n:08}.log")
}

fn corrupt(path: &Path, off: u64, what: &str) -> LogError {
    LogError::Corrupt {
        path: path.to_path_buf(),
        off,
        what: what.into(),
    }
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

/// The frame at `at`, its checksum checked.
fn read_raw(file: &File, path: &Path, at: Loc) -> Result<Vec<u8>, LogError> {
    let mut buf = vec![0u8; HEADER + at.len as usize];
    file.read_exact_at(&mut buf, at.off)
        .map_err(io_err("read", path))?;
    let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    if crc32fast::hash(&buf[HEADER..]) != crc {
        return Err(corrupt(path, at.off, "a damaged record (checksum)"));
    }
    Ok(buf)
}

impl<I: Index> Log<I> {
    /// Opens the log in `dir` (made if missing, owner-only), replaying every record into
    /// `index`. `service` is what an operator restarts after a failed sync.
    pub fn open(
        dir: &Path,
        segment_bytes: u64,
        service: &'static str,
        mut index: I,
    ) -> Result<Log<I>, LogError> {
        crate::fs::private_dir(dir).map_err(io_err("create", dir))?;
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
        let mut segs = Segments {
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
            segs.segments.insert(n, Segment::new(file, path.clone()));
            let mut off = 0usize;
            while off < bytes.len() {
                if let Some((what, torn)) = damage(&bytes, off) {
                    if !torn || Some(n) != last {
                        return Err(corrupt(&path, off as u64, what));
                    }
                    tracing::warn!(
                        path = %path.display(),
                        offset = off,
                        "the log ends in {what}, a write a stop interrupted before it was durable: cut off there"
                    );
                    let seg = segs.segment(n);
                    seg.file
                        .set_len(off as u64)
                        .and_then(|_| seg.file.sync_data())
                        .map_err(io_err("truncate", &path))?;
                    break;
                }
                let len = u32::from_le_bytes(bytes[off..off + 4].try_into().expect("4 bytes"));
                let payload = &bytes[off + HEADER..off + HEADER + len as usize];
                let at = Loc {
                    seg: n,
                    off: off as u64,
                    len,
                };
                index
                    .replay(&mut segs, at, payload)
                    .map_err(|what| corrupt(&path, off as u64, &what))?;
                segs.segment(n).records += 1;
                off += HEADER + len as usize;
            }
            segs.segment(n).len = off as u64;
            segs.current = n;
            segs.on_file = off as u64;
        }
        if last.is_none() {
            let path = dir.join(segment_name(1));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(io_err("create", &path))?;
            segs.segments.insert(1, Segment::new(file, path));
            segs.current = 1;
            segs.dir_unsynced = true;
        }
        Ok(Log {
            dir: dir.to_path_buf(),
            segment_bytes,
            service,
            inner: Mutex::new(State { segs, index }),
            syncing: Mutex::new(()),
        })
    }

    /// The segments and the index, for an append and its index update in one step.
    pub fn lock(&self) -> MutexGuard<'_, State<I>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses (with the error a sync would give) once a sync has failed: an owner that acts
    /// on what it appends checks this before appending, since nothing appended after a failed
    /// sync can become durable.
    pub fn refuse_if_failed(&self, segs: &Segments) -> Result<(), LogError> {
        match &segs.failed {
            Some(why) => Err(LogError::Failed {
                path: self.dir.clone(),
                why: why.clone(),
                service: self.service,
            }),
            None => Ok(()),
        }
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Closes the current segment once it is full: syncs it (with what was appended since the
    /// sync that found it full), then begins the next. A failure leaves the current segment
    /// open, to be closed by a later sync.
    fn rotate_if_full(&self, segs: &mut Segments) -> Result<(), LogError> {
        let n = segs.current;
        if segs.segment(n).len < self.segment_bytes {
            return Ok(());
        }
        segs.write_out()?;
        let seg = segs.segment(n);
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
        segs.segments.insert(n + 1, Segment::new(file, path));
        segs.current = n + 1;
        segs.on_file = 0;
        segs.dir_unsynced = true;
        Ok(())
    }

    /// Makes everything appended before this call durable.
    pub fn sync(&self) -> Result<(), LogError> {
        // One at a time: a sync that finds nothing to do must not return while another one is
        // still making the same appends durable.
        let _one = self.syncing.lock().unwrap_or_else(|p| p.into_inner());
        let (file, path, dir, upto) = {
            let mut st = self.lock();
            self.refuse_if_failed(&st.segs)?;
            let segs = &mut st.segs;
            if segs.appended == segs.synced && !segs.dir_unsynced {
                return Ok(()); // nothing appended since the last sync
            }
            let upto = segs.appended;
            segs.write_out()?;
            let dir = std::mem::take(&mut segs.dir_unsynced);
            let seg = segs
                .segments
                .get(&segs.current)
                .expect("the current segment");
            (seg.file.clone(), seg.path.clone(), dir, upto)
        };
        let mut done = file.sync_data().map_err(io_err("sync", &path));
        if done.is_ok() && dir {
            done = File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("sync", &self.dir));
        }
        let mut st = self.lock();
        if let Err(e) = done {
            st.segs.failed = Some(e.to_string());
            return Err(e);
        }
        st.segs.synced = st.segs.synced.max(upto);
        if let Err(e) = self.rotate_if_full(&mut st.segs) {
            // The sync itself is done; the segment is closed by a later one.
            tracing::warn!(
                "cannot begin the log's next segment in {}: {e}",
                self.dir.display()
            );
        }
        Ok(())
    }

    /// Deletes the oldest segments that hold nothing live, copying forward what little is;
    /// returns how many went. Nothing is deleted before everything written so far is durable:
    /// the records that made a deleted one stale must not be lost with it.
    pub fn compact(&self) -> Result<usize, LogError> {
        let mut deleted = 0;
        loop {
            let head = {
                let mut st = self.lock();
                let State { segs, index } = &mut *st;
                let Some((&head, seg)) = segs.segments.first_key_value() else {
                    break;
                };
                if head == segs.current {
                    break;
                }
                let (live, records) = (seg.live, seg.records);
                let (file, path) = (seg.file.clone(), seg.path.clone());
                if live > 0 {
                    let (all, all_live) = segs
                        .segments
                        .values()
                        .fold((0, 0), |(a, l), s| (a + s.len, l + s.live_bytes));
                    if live * 4 > records && all_live * 2 >= all {
                        break;
                    }
                    for (key, at) in index.live_in(head) {
                        let framed = read_raw(&file, &path, at)?;
                        let to = segs.append_framed(&framed, at.len);
                        segs.set_live(at, false);
                        segs.set_live(to, true);
                        index.moved(&key, to);
                    }
                }
                head
            };
            self.sync()?;
            let mut st = self.lock();
            let segs = &mut st.segs;
            // Only the current segment takes records: a closed one's live count cannot grow.
            if segs.segments.first_key_value().map(|(&n, s)| (n, s.live)) != Some((head, 0))
                || head == segs.current
            {
                break;
            }
            let seg = segs.segments.remove(&head).expect("the head segment");
            std::fs::remove_file(&seg.path).map_err(io_err("delete", &seg.path))?;
            segs.dir_unsynced = true;
            deleted += 1;
        }
        if deleted > 0 {
            self.sync()?;
        }
        Ok(deleted)
    }
}
