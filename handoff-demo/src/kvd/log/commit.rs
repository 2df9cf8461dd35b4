//! Group commit: the state the writers share with the one committer thread, and its loop,
//! which writes each batch with one `write_all`, fsyncs it once, applies it to the map and
//! wakes the writers it covered. A failed write or fsync fails the log, and the segment is cut
//! back to what is durable before anyone learns of the failure.

use super::recovery::Recovered;
use super::segment::{cut_to_durable, Active};
use super::wal::Stats;
use std::collections::HashMap;
use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;

/// Where the log is: what a `SET` is answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    /// Accepting writes.
    Open,
    /// Drained: writes are refused, the segment is not sealed yet.
    Frozen,
    /// The active segment is sealed and closed.
    Sealed,
    /// A write or fsync failed: no write until reopened.
    Failed(String),
}

/// A test's hook into the committer.
#[cfg(test)]
pub(super) type SyncHook = Arc<dyn Fn(usize) + Send + Sync>;

/// What the writers, the committer, and seal and reopen share.
pub(super) struct Shared {
    pub(super) dir: PathBuf,
    pub(super) state: Mutex<State>,
    /// The committer waits here for records (and for shutdown).
    pub(super) work: Condvar,
    /// Writers wait here for their fsync; seal and reopen for quiet.
    pub(super) done: Condvar,
    /// Test hook: called by the committer before each fsync, with the batch's record count.
    #[cfg(test)]
    pub(super) before_sync: Mutex<Option<SyncHook>>,
    /// Test fault: the next fdatasync fails with this errno (after its batch was written).
    #[cfg(test)]
    pub(super) sync_fault: Mutex<Option<i32>>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared").field("dir", &self.dir).finish()
    }
}

/// The log's state, under [`Shared::state`].
#[derive(Debug)]
pub(super) struct State {
    pub(super) mode: Mode,
    pub(super) active: Option<Active>,
    pub(super) map: HashMap<String, String>,
    /// The last revision given to a `SET`.
    pub(super) assigned: u64,
    /// The last revision fsynced and applied to `map`.
    pub(super) durable: u64,
    /// Encoded records waiting for the committer, and what they set.
    pub(super) batch: Vec<u8>,
    pub(super) batch_sets: Vec<(u64, String, String)>,
    /// The committer is writing a batch (outside the lock).
    pub(super) committing: bool,
    /// Writers waiting for their fsync.
    pub(super) waiters: usize,
    pub(super) fingerprint: u64,
    pub(super) stats: Stats,
    pub(super) shutdown: bool,
}

impl State {
    /// Nothing in flight: no batch, no commit, no writer waiting.
    pub(super) fn quiet(&self) -> bool {
        self.batch.is_empty() && !self.committing && self.waiters == 0
    }
}

impl Shared {
    /// The log as recovered, writing `active`, accepting writes; no committer yet (see
    /// [`spawn_committer`]).
    pub(super) fn new(dir: &Path, recovered: Recovered, active: Active) -> Shared {
        Shared {
            dir: dir.to_path_buf(),
            state: Mutex::new(State {
                mode: Mode::Open,
                active: Some(active),
                map: recovered.map,
                assigned: recovered.revision,
                durable: recovered.revision,
                batch: Vec::new(),
                batch_sets: Vec::new(),
                committing: false,
                waiters: 0,
                fingerprint: recovered.fingerprint,
                stats: Stats::default(),
                shutdown: false,
            }),
            work: Condvar::new(),
            done: Condvar::new(),
            #[cfg(test)]
            before_sync: Mutex::new(None),
            #[cfg(test)]
            sync_fault: Mutex::new(None),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn wait_quiet<'a>(&self, mut s: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        while !s.quiet() {
            s = self.done.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s
    }

    /// If there is an active segment, cut it back to its durable length (see
    /// [`cut_to_durable`]); that length. The segment stays active, so that a cut that failed
    /// is tried again; the seal or reopen that follows closes it. Called with no write in
    /// flight: the log failed, so nothing is queued, and nothing is being committed.
    pub(super) fn cut_active_to_durable(&self) -> io::Result<u64> {
        let Some((name, durable_len)) = self
            .lock()
            .active
            .as_ref()
            .map(|a| (a.name.clone(), a.durable_len))
        else {
            return Ok(0);
        };
        cut_to_durable(&self.dir, &name, durable_len)?;
        Ok(durable_len)
    }

    /// The committer: take the whole batch, write it, fsync once, apply, wake its writers;
    /// until [`State::shutdown`] with nothing left to write.
    fn commit_loop(&self) {
        let mut s = self.lock();
        loop {
            while s.batch.is_empty() && !s.shutdown {
                s = self.work.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            if s.batch.is_empty() {
                return; // shut down
            }
            let batch = std::mem::take(&mut s.batch);
            let sets = std::mem::take(&mut s.batch_sets);
            let Some(file) = s.active.as_ref().map(|a| Arc::clone(&a.file)) else {
                s.mode = Mode::Failed("no active segment".into());
                self.done.notify_all();
                continue;
            };
            s.committing = true;
            drop(s);
            #[cfg(test)]
            {
                let hook = self.before_sync.lock().unwrap().clone();
                if let Some(hook) = hook {
                    hook(sets.len());
                }
            }
            let written = (&*file).write_all(&batch).and_then(|()| {
                #[cfg(test)]
                if let Some(errno) = self.sync_fault.lock().unwrap().take() {
                    return Err(io::Error::from_raw_os_error(errno));
                }
                file.sync_data()
            });
            // A failed batch is cut off before anyone learns of the failure (still
            // `committing`: a seal or reopen waits), so that no reader, and no recovery after
            // a crash, finds it in the page cache.
            let cut = written.is_err().then(|| self.cut_active_to_durable());
            s = self.lock();
            s.committing = false;
            match (written, cut) {
                (Ok(()), _) => {
                    let active = s.active.as_mut().expect("not closed while committing");
                    active.crc.update(&batch);
                    active.records += sets.len() as u64;
                    active.durable_len += batch.len() as u64;
                    s.stats.fsyncs += 1;
                    s.stats.records += sets.len() as u64;
                    for (revision, key, value) in sets {
                        s.map.insert(key, value);
                        s.durable = revision;
                    }
                }
                (Err(e), cut) => {
                    // No more writes until the segment is sealed or reopened (which cut it
                    // again, had this cut failed). What was queued behind this batch fails
                    // too.
                    let name = s.active.as_ref().map_or("?", |a| &a.name).to_string();
                    crate::kvd::say(&match cut {
                        Some(Err(cut)) => format!("writing {name} failed: {e}; {cut}"),
                        _ => format!("writing {name} failed: {e}; cut back to what is durable"),
                    });
                    s.mode = Mode::Failed(format!("writing {name}: {e}"));
                    s.batch.clear();
                    s.batch_sets.clear();
                }
            }
            self.done.notify_all();
        }
    }
}

/// Start the committer thread of `shared`; it ends once [`State::shutdown`] is set (and
/// [`Shared::work`] notified) with no batch left.
pub(super) fn spawn_committer(shared: &Arc<Shared>) -> io::Result<thread::JoinHandle<()>> {
    let shared = Arc::clone(shared);
    thread::Builder::new()
        .name("kvd-committer".into())
        .spawn(move || shared.commit_loop())
}

#[cfg(test)]
mod tests {
    use crate::kvd::log::record::FRAME;
    use crate::kvd::log::segment::segment_name;
    use crate::kvd::log::testutil::{seg, set_record, FIRST_SET};
    use crate::kvd::log::{recover, SetError, Wal};
    use crate::kvd::testutil::{root, TempDir};
    use std::fs;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};
    use std::thread;
    use std::time::{Duration, Instant};

    /// An fdatasync that fails (here injected; a disk's EIO) leaves the batch's records in
    /// the page cache, perhaps never to reach the disk. They were not acknowledged, and a seal
    /// or a reopen must not build on them: the segment is cut back to what the last good
    /// fdatasync covered before it is read again.
    #[test]
    fn a_failed_fdatasync_cuts_the_segment_to_its_durable_length_before_sealing() {
        const EIO: i32 = 5;
        for then in ["seal", "reopen"] {
            let dir = TempDir::new("eio");
            let wal = Wal::open(dir.path()).unwrap();
            assert_eq!(wal.set("a", "1"), Ok(1));
            assert_eq!(wal.set("b", "2"), Ok(2));
            let durable = fs::metadata(seg(&dir, 1)).unwrap().len();
            wal.fail_next_sync(EIO);
            let Err(SetError::Failed(e)) = wal.set("c", "3") else {
                panic!("a write whose fdatasync failed was acknowledged")
            };
            assert!(e.contains("Input/output error"), "{e}");
            assert_eq!(
                fs::metadata(seg(&dir, 1)).unwrap().len(),
                durable,
                "the failed batch is cut off at once"
            );
            if then == "seal" {
                let sealed = wal.seal().unwrap();
                assert_eq!(sealed.revision, 2, "sealed a write whose fdatasync failed");
                assert_eq!(
                    fs::metadata(seg(&dir, 1)).unwrap().len(),
                    durable + (FRAME + 21) as u64,
                    "cut to the durable length, then the footer"
                );
                let successor = Wal::open(dir.path()).unwrap();
                assert_eq!(successor.revision(), 2);
                assert_eq!(successor.fingerprint(), sealed.fingerprint);
                assert_eq!(successor.get("c"), None);
            } else {
                wal.reopen().unwrap();
                assert_eq!(
                    wal.revision(),
                    2,
                    "reopened on a write whose fdatasync failed"
                );
                assert_eq!(wal.get("c"), None);
                assert_eq!(wal.set("c", "again"), Ok(3));
                drop(wal);
                let r = recover(dir.path()).unwrap();
                assert_eq!(r.revision, 3);
                assert_eq!(r.map.get("c").map(String::as_str), Some("again"));
                assert_eq!(
                    fs::metadata(seg(&dir, 1)).unwrap().len(),
                    durable + (FRAME + 21) as u64,
                    "cut to the durable length, then the footer"
                );
            }
        }
    }

    /// A real failure: a batch of two writes on a full disk (a tmpfs in a private mount
    /// namespace), the first fitting whole, the second not. Neither is acknowledged; once
    /// space is freed the seal keeps exactly the acknowledged writes (it used to seal the
    /// first of the failed batch too, from the page cache).
    #[test]
    fn a_batch_cut_by_a_full_disk_is_not_sealed() {
        let Some(dir) = on_private_tmpfs(
            "kvd::log::commit::tests::a_batch_cut_by_a_full_disk_is_not_sealed",
            "8k",
        ) else {
            return;
        };
        let page = rustix::fs::statvfs(&dir).unwrap().f_bsize as usize;
        // Two pages: one for this, one for the segment.
        fs::write(dir.join("ballast"), vec![0xa5u8; page]).unwrap();
        let wal = Arc::new(Wal::open(&dir).unwrap());
        let (entered_tx, entered) = mpsc::channel::<usize>();
        let (release, release_rx) = mpsc::channel::<()>();
        let (entered_tx, release_rx) = (Mutex::new(entered_tx), Mutex::new(release_rx));
        wal.set_before_sync(move |n| {
            let _ = entered_tx.lock().unwrap().send(n);
            if n == 1 {
                let _ = release_rx
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(30));
            }
        });
        let set = |key: &'static str, value: String| {
            let wal = Arc::clone(&wal);
            thread::spawn(move || wal.set(key, &value))
        };
        let queued = |n: usize| {
            let until = Instant::now() + Duration::from_secs(30);
            while wal.shared.lock().batch_sets.len() < n {
                assert!(Instant::now() < until, "writers did not queue");
                thread::yield_now();
            }
        };
        let a = set("a", "1".into());
        assert_eq!(entered.recv_timeout(Duration::from_secs(30)).unwrap(), 1);
        // The next batch: `b` fills the segment's page to its last byte, `c` needs another.
        let used = FIRST_SET + set_record(1, "a", "1").len();
        let b_len = page - used - set_record(2, "b", "").len();
        let b = set("b", "x".repeat(b_len));
        queued(1);
        let c = set("c", "3".into());
        queued(2);
        release.send(()).unwrap();
        assert_eq!(a.join().unwrap(), Ok(1));
        for w in [b, c] {
            let Err(SetError::Failed(e)) = w.join().unwrap() else {
                panic!("a write that did not fit was acknowledged")
            };
            assert!(e.contains("No space left on device"), "{e}");
        }
        assert_eq!(
            fs::metadata(dir.join(segment_name(1))).unwrap().len() as usize,
            used,
            "the failed batch is cut off at once (b had reached the file whole)"
        );
        // Space again.
        fs::remove_file(dir.join("ballast")).unwrap();
        let sealed = wal.seal().unwrap();
        assert_eq!(
            sealed.revision, 1,
            "sealed a write that was not acknowledged"
        );
        let successor = Wal::open(&dir).unwrap();
        assert_eq!(successor.revision(), 1);
        assert_eq!(successor.get("a").as_deref(), Some("1"));
        assert_eq!(successor.get("b"), None);
    }

    /// Run the test `name` again in a private mount namespace, with a tmpfs of `size` mounted
    /// at a fresh directory: there, the tmpfs's path; here, `None` once that run passed.
    /// Mounting needs root: without it the test is skipped with one line, or fails if
    /// `HANDOFF_REQUIRE_ROOT_TESTS=1`. The namespace, and the mount, end with that run.
    fn on_private_tmpfs(name: &str, size: &str) -> Option<PathBuf> {
        const INNER: &str = "KVD_TEST_PRIVATE_TMPFS";
        if let Some(dir) = std::env::var_os(INNER) {
            return Some(dir.into());
        }
        if !root(name, "a tmpfs mounted in a private mount namespace") {
            return None;
        }
        let at = TempDir::new("tmpfs");
        let mut child = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(
                r#"mount -t tmpfs -o "size=$1,mode=0700" tmpfs "$2" && exec "$3" --exact "$4" --nocapture --test-threads=1"#,
            )
            .arg("sh")
            .arg(size)
            .arg(at.path())
            .arg(std::env::current_exe().unwrap())
            .arg(name)
            .env(INNER, at.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run unshare");
        // Our child, not waited for yet: the pidfd refers to it.
        let pidfd = rustix::process::pidfd_open(
            rustix::process::Pid::from_child(&child),
            rustix::process::PidfdFlags::empty(),
        )
        .unwrap();
        let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let read = |mut r: Box<dyn std::io::Read + Send>| {
            thread::spawn(move || {
                let mut s = String::new();
                let _ = r.read_to_string(&mut s);
                s
            })
        };
        let (out, err) = (read(Box::new(out)), read(Box::new(err)));
        let mut fds = [rustix::event::PollFd::new(
            &pidfd,
            rustix::event::PollFlags::IN,
        )];
        let bound = rustix::event::Timespec::try_from(Duration::from_secs(60)).unwrap();
        if rustix::event::poll(&mut fds, Some(&bound)).unwrap() == 0 {
            let _ = child.kill();
        }
        let status = child.wait().unwrap();
        let (out, err) = (out.join().unwrap(), err.join().unwrap());
        assert!(
            status.success() && out.contains("1 passed"),
            "{name} in a private mount namespace: {status}\n{out}\n{err}"
        );
        None
    }

    /// No writer is acknowledged before the fsync covering its record has returned, and
    /// writers waiting together share one fsync.
    #[test]
    fn group_commit_acknowledges_only_after_the_fsync() {
        let dir = TempDir::new("group");
        let wal = Arc::new(Wal::open(dir.path()).unwrap());
        let acked = Arc::new(AtomicUsize::new(0));
        // The first fsync blocks until the test lets it go.
        let (entered_tx, entered) = mpsc::channel::<usize>();
        let (release, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let acked_at_sync = Arc::new(Mutex::new(Vec::new()));
        {
            let acked = Arc::clone(&acked);
            let acked_at_sync = Arc::clone(&acked_at_sync);
            let entered_tx = Mutex::new(entered_tx);
            wal.set_before_sync(move |n| {
                acked_at_sync
                    .lock()
                    .unwrap()
                    .push(acked.load(Ordering::SeqCst));
                let _ = entered_tx.lock().unwrap().send(n);
                let _ = release_rx
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(30));
            });
        }
        const WRITERS: usize = 8;
        let writers: Vec<_> = (0..WRITERS)
            .map(|i| {
                let (wal, acked) = (Arc::clone(&wal), Arc::clone(&acked));
                thread::spawn(move || {
                    let rev = wal.set(&format!("k{i}"), &format!("v{i}")).unwrap();
                    assert!(wal.shared.lock().durable >= rev);
                    acked.fetch_add(1, Ordering::SeqCst);
                    rev
                })
            })
            .collect();
        let first = entered.recv_timeout(Duration::from_secs(30)).unwrap();
        assert!(first >= 1);
        // The committer is inside the first fsync: every writer is still waiting, and the
        // ones that came since are queued for the next batch.
        let until = Instant::now() + Duration::from_secs(30);
        while wal.shared.lock().batch_sets.len() < WRITERS - first {
            assert!(Instant::now() < until, "writers did not queue");
            thread::yield_now();
        }
        assert_eq!(
            acked.load(Ordering::SeqCst),
            0,
            "acknowledged before the fsync"
        );
        release.send(()).unwrap(); // first batch
        if first < WRITERS {
            let second = entered.recv_timeout(Duration::from_secs(30)).unwrap();
            assert_eq!(
                first + second,
                WRITERS,
                "the queued writers share one fsync"
            );
            release.send(()).unwrap();
        }
        let mut revs: Vec<u64> = writers.into_iter().map(|w| w.join().unwrap()).collect();
        revs.sort();
        assert_eq!(revs, (1..=WRITERS as u64).collect::<Vec<_>>());
        let stats = wal.stats();
        assert_eq!(stats.records, WRITERS as u64);
        assert_eq!(stats.fsyncs, if first < WRITERS { 2 } else { 1 });
        // At the start of each fsync, at most the records of the earlier fsyncs were acked.
        let at_sync = acked_at_sync.lock().unwrap().clone();
        assert_eq!(at_sync[0], 0);
        if let Some(&n) = at_sync.get(1) {
            assert!(
                n <= first,
                "{n} acked before the second fsync, {first} were durable"
            );
        }
    }

    /// Many writers, free running: fewer fsyncs than records, every ack durable at the time,
    /// everything acknowledged there after a reopen.
    #[test]
    fn group_commit_under_concurrency() {
        let dir = TempDir::new("stress");
        let wal = Arc::new(Wal::open(dir.path()).unwrap());
        const WRITERS: u64 = 16;
        const EACH: u64 = 50;
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let wal = Arc::clone(&wal);
                thread::spawn(move || {
                    let mut acked = Vec::new();
                    for i in 0..EACH {
                        let (k, v) = (format!("w{w}-{i}"), format!("{w}:{i}"));
                        let rev = wal.set(&k, &v).unwrap();
                        let s = wal.stats();
                        assert!(s.records >= rev, "rev {rev} acked, {} durable", s.records);
                        acked.push((k, v, rev));
                    }
                    acked
                })
            })
            .collect();
        let acked: Vec<_> = writers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        let stats = wal.stats();
        assert_eq!(stats.records, WRITERS * EACH);
        assert!(
            stats.fsyncs < stats.records,
            "no group commit: {} fsyncs for {} records",
            stats.fsyncs,
            stats.records
        );
        let mut revs: Vec<u64> = acked.iter().map(|a| a.2).collect();
        revs.sort();
        revs.dedup();
        assert_eq!(revs.len() as u64, WRITERS * EACH, "revisions are unique");
        drop(wal);
        // A crash now (no seal): everything acknowledged is recovered.
        let r = recover(dir.path()).unwrap();
        assert_eq!(r.revision, WRITERS * EACH);
        for (k, v, _) in &acked {
            assert_eq!(r.map.get(k), Some(v));
        }
        eprintln!(
            "group commit: {} records in {} fsyncs",
            stats.records, stats.fsyncs
        );
    }
}
