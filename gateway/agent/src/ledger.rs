//! The `gateway.ledger` command's file: one line `<command id> <payload>` per execution, each
//! durable before the command reports it appended.
//!
//! Appends share their `fdatasync` (group commit): a caller writes its line under the lock, and
//! whoever finds no sync under way syncs everything written so far while the others wait for
//! it. With 64 commands in flight that is one sync for many lines instead of one each, and the
//! file stays open instead of being opened per line. A failed sync fails every line it covered
//! and the file is opened again for the next one.

use std::io::{BufRead, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

/// The ledger file, shared by every execution of `gateway.ledger`.
pub struct Ledger {
    path: PathBuf,
    state: Mutex<State>,
    synced: Condvar,
}

#[derive(Default)]
struct State {
    file: Option<Arc<std::fs::File>>,
    /// Lines written so far, and lines known durable (counts since the start).
    written: u64,
    durable: u64,
    /// A sync is under way (its caller wakes the others when it ends).
    syncing: bool,
    /// Failed syncs, newest last: the lines after `.0` up to `.1` failed with `.2` (a sync
    /// that failed proves nothing for what it covered, whatever a later one says).
    failed: std::collections::VecDeque<(u64, u64, String)>,
}

impl Ledger {
    pub fn new(path: PathBuf) -> Ledger {
        Ledger {
            path,
            state: Mutex::default(),
            synced: Condvar::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The 1-based line number of `id`'s line, if the ledger has one (a recovered execution
    /// looks before it appends again).
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

    /// Appends `line` (newline added) and returns once it is durable. Blocking.
    pub fn append(&self, line: &str) -> std::io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let file = match &st.file {
            Some(f) => f.clone(),
            None => {
                let f = Arc::new(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&self.path)?,
                );
                st.file = Some(f.clone());
                f
            }
        };
        // One write per line, under the lock: lines never interleave.
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        if let Err(e) = (&*file).write_all(&bytes) {
            st.file = None;
            return Err(e);
        }
        st.written += 1;
        let mine = st.written;
        loop {
            if let Some((_, _, e)) = st
                .failed
                .iter()
                .find(|(after, upto, _)| *after < mine && mine <= *upto)
            {
                return Err(std::io::Error::other(format!(
                    "cannot make the line durable: {e}"
                )));
            }
            if st.durable >= mine {
                return Ok(());
            }
            if !st.syncing {
                let upto = st.written;
                st.syncing = true;
                // Any open handle syncs the file's data: this caller's will do.
                drop(st);
                let r = file.sync_data();
                st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                st.syncing = false;
                match r {
                    Ok(()) => st.durable = st.durable.max(upto),
                    Err(e) => {
                        let after = st.durable;
                        st.failed.push_back((after, upto, e.to_string()));
                        st.durable = st.durable.max(upto);
                        if st.failed.len() > 64 {
                            st.failed.pop_front();
                        }
                        st.file = None;
                    }
                }
                self.synced.notify_all();
                continue;
            }
            st = self.synced.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_appends_are_each_one_whole_line_and_all_durable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Arc::new(Ledger::new(dir.path().join("ledger")));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let ledger = ledger.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        ledger
                            .append(&format!("c-{t}-{i} {{\"i\":{i}}}"))
                            .expect("append");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
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
        assert_eq!(ledger.find("c-3-7").expect("find"), {
            let n = lines
                .iter()
                .position(|l| l.starts_with("c-3-7 "))
                .expect("line");
            Some(n + 1)
        });
        assert_eq!(ledger.find("c-9-0").expect("find"), None);
    }

    #[test]
    fn a_ledger_that_cannot_be_opened_fails_the_append_and_recovers_later() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub").join("ledger");
        let ledger = Ledger::new(path.clone());
        let e = ledger.append("a {}").expect_err("no directory yet");
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        ledger.append("b {}").expect("append");
        assert_eq!(std::fs::read_to_string(path).expect("read"), "b {}\n");
    }
}
