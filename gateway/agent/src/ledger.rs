//! The `gateway.ledger` command's file: one line `<command id> <payload>` per execution, each
//! durable before the command reports it appended.
//!
//! One thread, `pcg-ledger` (a [`pcg_durable::Batches`], as the stores' flushers are), owns the
//! file and does every write and `fdatasync` (group commit):
//! an append hands its line over and waits (asynchronously) for the answer; the thread takes
//! every line queued up, writes them in one `write` and syncs once. With 64 commands in flight
//! that is one write and one sync for many lines, and no blocking thread per command (an
//! earlier version wrote and synced on tokio's blocking pool, one thread per line waiting on a
//! condition variable, and the hand-offs cost more than the sync). The file stays open between
//! lines. A failed write or sync fails every line of its batch (a sync that failed proves
//! nothing for what it covered, whatever a later one says), and the file is opened again for
//! the next batch.

use std::io::{BufRead, Write as _};
use std::path::{Path, PathBuf};

use pcg_durable::Batches;

/// What became of a batch: the kind of error (kept for callers that tell them apart) and what
/// failed.
type Answer = Result<(), (std::io::ErrorKind, String)>;

/// The ledger file, shared by every execution of `gateway.ledger`.
pub struct Ledger {
    path: PathBuf,
    writer: Batches<String, Answer>,
}

impl Ledger {
    /// Starts the ledger's thread (it ends when the ledger is dropped). The file is created at
    /// the first append.
    pub fn new(path: PathBuf) -> Ledger {
        let mut file = None;
        let mut bytes = Vec::new();
        let at = path.clone();
        let writer = Batches::start("pcg-ledger", move |lines: &[String]| {
            bytes.clear();
            for line in lines {
                bytes.extend_from_slice(line.as_bytes());
                bytes.push(b'\n');
            }
            let r = write_and_sync(&at, &mut file, &bytes);
            if r.is_err() {
                // What this handle had written is in doubt: the next batch opens the file anew.
                file = None;
            }
            if bytes.capacity() > 1 << 20 {
                bytes = Vec::new();
            }
            r
        });
        Ledger { path, writer }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The 1-based line number of `id`'s line, if the ledger has one (a recovered execution
    /// looks before it appends again). Blocking: it reads the file.
    pub fn find(&self, id: &str) -> std::io::Result<Option<usize>> {
        if !self.path.exists() {
            return Ok(None);
        }
        let f = std::fs::File::open(&self.path)?;
        for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
            if line?.split(' ').next() == Some(id) {
                return Ok(Some(n + 1));
            }
        }
        Ok(None)
    }

    /// Appends `line` (newline added) and returns once it is durable.
    pub async fn append(&self, line: String) -> std::io::Result<()> {
        self.writer
            .ask(line)
            .await
            .ok_or_else(|| std::io::Error::other("the ledger's writer thread has stopped"))?
            .map_err(|(kind, e)| std::io::Error::new(kind, e))
    }
}

fn write_and_sync(path: &Path, file: &mut Option<std::fs::File>, bytes: &[u8]) -> Answer {
    let failed = |what: &'static str| move |e: std::io::Error| (e.kind(), format!("{what}{e}"));
    let f = match file {
        Some(f) => f,
        None => file.insert(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(failed(""))?,
        ),
    };
    // One write for the whole batch (the file is opened for appending): lines never
    // interleave.
    f.write_all(bytes).map_err(failed(""))?;
    f.sync_data()
        .map_err(failed("cannot make the line durable: "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_are_each_one_whole_line_and_all_durable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Arc::new(Ledger::new(dir.path().join("ledger")));
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let ledger = ledger.clone();
                tokio::spawn(async move {
                    for i in 0..50 {
                        ledger
                            .append(format!("c-{t}-{i} {{\"i\":{i}}}"))
                            .await
                            .expect("append");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
        let text = std::fs::read_to_string(ledger.path()).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 400);
        let mut ids: Vec<&str> = lines
            .iter()
            .map(|l| l.split(' ').next().expect("id"))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 400, "every line once");
        for l in &lines {
            let (id, body) = l.split_once(' ').expect("two fields");
            let i: u32 = id.rsplit('-').next().expect("i").parse().expect("number");
            assert_eq!(body, format!("{{\"i\":{i}}}"), "a whole line: {l}");
        }
        assert_eq!(ledger.find("c-3-7").expect("find"), {
            let n = lines
                .iter()
                .position(|l| l.starts_with("c-3-7 "))
                .expect("line");
            Some(n + 1)
        });
        assert_eq!(ledger.find("c-9-0").expect("find"), None);
    }

    #[tokio::test]
    async fn a_ledger_that_cannot_be_opened_fails_the_append_and_recovers_later() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub").join("ledger");
        let ledger = Ledger::new(path.clone());
        let e = ledger
            .append("a {}".into())
            .await
            .expect_err("no directory yet");
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        ledger.append("b {}".into()).await.expect("append");
        assert_eq!(std::fs::read_to_string(path).expect("read"), "b {}\n");
    }
}
