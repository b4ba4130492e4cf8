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
//! nothing for what it covered, whatever a later one says), the file is cut back to where the
//! batch began (a full disk leaves no half batch behind) and opened again for the next batch.

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
    // Where the batch starts: a batch that fails is cut off there, so the file never keeps a
    // line whose command was told it failed (a full disk can take half a batch; a failed sync
    // leaves what it covered to chance).
    let start = f.metadata().map_err(failed(""))?.len();
    // One write for the whole batch (the file is opened for appending): lines never
    // interleave.
    let r = f.write_all(bytes).map_err(failed("")).and_then(|()| {
        f.sync_data()
            .map_err(failed("cannot make the line durable: "))
    });
    if r.is_err() {
        let cut = f.set_len(start).and_then(|()| f.sync_data());
        if let Err(e) = cut {
            tracing::error!(ledger = %path.display(), "a failed batch of the ledger could not be cut off at byte {start}: {e}; its lines may stay in the file although their commands failed");
        }
    }
    r
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

    /// A full disk in the middle of a batch, made real with the file size limit
    /// (`RLIMIT_FSIZE`): the limit applies to a whole process, so the writing happens in a
    /// child process of this test binary, which runs this test again with the variable set. The
    /// child starts with `SIGXFSZ` ignored (set by `sh`, kept across `exec`): past the limit a
    /// write then fails with `EFBIG` instead of the process being killed.
    #[test]
    fn a_batch_cut_short_by_a_full_disk_leaves_no_line_of_it() {
        const CHILD: &str = "PCG_LEDGER_FULL_DISK_DIR";
        if let Some(dir) = std::env::var_os(CHILD) {
            full_disk_in_this_process(Path::new(&dir));
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let out = std::process::Command::new("sh")
            .args(["-c", "trap '' XFSZ; exec \"$0\" \"$@\""])
            .arg(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "ledger::tests::a_batch_cut_short_by_a_full_disk_leaves_no_line_of_it",
                "--nocapture",
            ])
            .env(CHILD, dir.path())
            .output()
            .expect("run the child");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{said}");
        assert!(said.contains("1 passed"), "the child ran the test: {said}");
        let text = std::fs::read_to_string(dir.path().join("ledger")).expect("read");
        assert_eq!(text, "a {}\nc {}\n");
    }

    fn full_disk_in_this_process(dir: &Path) {
        use rustix::process::{getrlimit, setrlimit, Resource};
        let limit = |bytes: Option<u64>| {
            let mut l = getrlimit(Resource::Fsize);
            l.current = match (bytes, l.maximum) {
                (Some(b), Some(max)) => Some(b.min(max)),
                (b, max) => b.or(max),
            };
            setrlimit(Resource::Fsize, l).expect("set the file size limit");
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let ledger = Ledger::new(dir.join("ledger"));
            ledger.append("a {}".into()).await.expect("first line");
            limit(Some(4096));
            // Half of it fits: the write stops at the limit.
            let big = format!("b {}", "x".repeat(8192));
            let e = ledger.append(big).await.expect_err("past the limit");
            assert_eq!(e.kind(), std::io::ErrorKind::FileTooLarge, "{e}");
            assert_eq!(
                std::fs::read_to_string(ledger.path()).expect("read"),
                "a {}\n",
                "the failed batch is cut off"
            );
            limit(None);
            ledger.append("c {}".into()).await.expect("room again");
        });
    }
}
