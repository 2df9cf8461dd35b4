//! The [`Wal`]: what the server holds. It opens the log (recovery, then a new segment and the
//! committer), queues each `SET` for group commit and waits for its fsync, and at a handoff
//! freezes, seals and, after a rollback, reopens it.

use super::commit::{spawn_committer, Mode, Shared};
use super::record::{encode, Record};
use super::recovery::recover;
use super::segment::{create_segment, fingerprint_with, sync_dir};
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::Instant;

/// Why a `SET` was not acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SetError {
    /// A handoff is in progress: the write was not applied; send it again.
    Retry,
    /// Writing the log failed; no write is accepted until the log is reopened.
    Failed(String),
}

/// Counters, for tests and the log line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Batches written and fsynced.
    pub fsyncs: u64,
    /// `SET` records made durable.
    pub records: u64,
}

/// What [`Wal::seal`] left on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sealed {
    /// The last revision.
    pub revision: u64,
    /// The fingerprint of all sealed segments.
    pub fingerprint: u64,
}

/// The open log: the map, the active segment and the committer thread.
#[derive(Debug)]
pub struct Wal {
    pub(super) shared: Arc<Shared>,
    committer: Option<thread::JoinHandle<()>>,
}

impl Wal {
    /// Recover the log in `dir` (see [`recover`]), open a new segment, start the committer.
    pub fn open(dir: &Path) -> io::Result<Wal> {
        let recovered = recover(dir)?;
        let active = create_segment(dir, recovered.next_segment, recovered.revision)?;
        if let Some(what) = &recovered.repaired {
            crate::kvd::say(&format!("recovery: {what}"));
        }
        let shared = Arc::new(Shared::new(dir, recovered, active));
        let committer = spawn_committer(&shared)?;
        Ok(Wal {
            shared,
            committer: Some(committer),
        })
    }

    /// Append `SET key value`; its revision once the fsync covering it returned.
    pub fn set(&self, key: &str, value: &str) -> Result<u64, SetError> {
        let sh = &self.shared;
        let mut s = sh.lock();
        match &s.mode {
            Mode::Open => {}
            Mode::Frozen | Mode::Sealed => return Err(SetError::Retry),
            Mode::Failed(e) => return Err(SetError::Failed(e.clone())),
        }
        let revision = s.assigned + 1;
        s.assigned = revision;
        encode(
            &Record::Set {
                revision,
                key,
                value,
            },
            &mut s.batch,
        );
        s.batch_sets
            .push((revision, key.to_string(), value.to_string()));
        sh.work.notify_one();
        s.waiters += 1;
        let result = loop {
            if s.durable >= revision {
                break Ok(revision);
            }
            if let Mode::Failed(e) = &s.mode {
                break Err(SetError::Failed(e.clone()));
            }
            s = sh.done.wait(s).unwrap_or_else(|p| p.into_inner());
        };
        s.waiters -= 1;
        sh.done.notify_all();
        result
    }

    /// The value of `key`, as of the last fsync.
    pub fn get(&self, key: &str) -> Option<String> {
        self.shared.lock().map.get(key).cloned()
    }

    /// The last durable revision.
    pub fn revision(&self) -> u64 {
        self.shared.lock().durable
    }

    /// The fingerprint of the sealed segments.
    pub fn fingerprint(&self) -> u64 {
        self.shared.lock().fingerprint
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.shared.lock().stats
    }

    /// Refuse writes from now on ([`SetError::Retry`]); the ones already queued commit.
    pub fn freeze(&self) {
        let mut s = self.shared.lock();
        if s.mode == Mode::Open {
            s.mode = Mode::Frozen;
        }
    }

    /// Wait until no write is in flight (queued, being committed or waiting for its
    /// acknowledgement), or `deadline`; whether it is so.
    pub fn wait_quiet(&self, deadline: Instant) -> bool {
        let sh = &self.shared;
        let mut s = sh.lock();
        while !s.quiet() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = sh
                .done
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Freeze, wait for the writes in flight, write the active segment's footer, fsync and
    /// close it. Nothing is written after this until [`reopen`](Self::reopen). A failed log is
    /// sealed by recovery (see `seal_failed`).
    pub fn seal(&self) -> io::Result<Sealed> {
        let sh = &self.shared;
        let mut s = sh.lock();
        match &s.mode {
            Mode::Open => s.mode = Mode::Frozen,
            Mode::Frozen => {}
            Mode::Sealed => {
                return Ok(Sealed {
                    revision: s.durable,
                    fingerprint: s.fingerprint,
                })
            }
            Mode::Failed(_) => {
                drop(s);
                return self.seal_failed();
            }
        }
        s = sh.wait_quiet(s);
        if let Mode::Failed(_) = &s.mode {
            // The last batch failed while we waited: the segment may end with part of it.
            drop(s);
            return self.seal_failed();
        }
        let active = s
            .active
            .take()
            .ok_or_else(|| io::Error::other("no active segment"))?;
        let revision = s.durable;
        drop(s); // GETs go on meanwhile; nothing else touches the log while frozen
        let mut footer = Vec::new();
        encode(
            &Record::Footer {
                records: active.records,
                last_revision: revision,
                checksum: active.crc.value(),
            },
            &mut footer,
        );
        let written = (&*active.file)
            .write_all(&footer)
            .and_then(|()| active.file.sync_all())
            .and_then(|()| sync_dir(&sh.dir));
        let mut s = sh.lock();
        if let Err(e) = written {
            let why = format!("sealing {}: {e}", active.name);
            s.mode = Mode::Failed(why.clone());
            // Kept, with its durable length: the footer may be in the page cache only.
            s.active = Some(active);
            return Err(io::Error::new(e.kind(), why));
        }
        s.fingerprint = fingerprint_with(s.fingerprint, &active.name, &footer);
        s.mode = Mode::Sealed;
        Ok(Sealed {
            revision,
            fingerprint: s.fingerprint,
        })
    }

    /// Seal a log whose write failed (a full disk, say): cut the active segment back to its
    /// durable length (see [`cut_to_durable`](super::segment::cut_to_durable)), then recover
    /// from disk the way a successor would open it, which writes the footer. The writes of
    /// the failed batch were not acknowledged, and none of them is kept. If this fails too
    /// (the disk is still full), the log stays failed and the error says why.
    fn seal_failed(&self) -> io::Result<Sealed> {
        let sh = &self.shared;
        drop(sh.wait_quiet(sh.lock()));
        sh.cut_active_to_durable()
            .map_err(|e| io::Error::new(e.kind(), format!("sealing the failed log: {e}")))?;
        drop(sh.lock().active.take());
        let recovered = recover(&sh.dir).map_err(|e| {
            io::Error::new(e.kind(), format!("sealing the failed log by recovery: {e}"))
        })?;
        if let Some(what) = &recovered.repaired {
            crate::kvd::say(&format!("recovery: {what}"));
        }
        let mut s = sh.lock();
        s.map = recovered.map;
        s.assigned = recovered.revision;
        s.durable = recovered.revision;
        s.fingerprint = recovered.fingerprint;
        s.mode = Mode::Sealed;
        Ok(Sealed {
            revision: recovered.revision,
            fingerprint: recovered.fingerprint,
        })
    }

    /// After a handoff was rolled back (or the log failed): close the active segment if any,
    /// recover from disk, open a new segment and accept writes again. If that fails (a full
    /// disk), the log is left failed: writes are answered with this error (not `retry`), reads
    /// go on, and a later seal or reopen tries again.
    pub fn reopen(&self) -> io::Result<()> {
        let sh = &self.shared;
        let mut s = sh.lock();
        if s.mode == Mode::Open {
            s.mode = Mode::Frozen;
        }
        s = sh.wait_quiet(s);
        let failed = matches!(s.mode, Mode::Failed(_));
        if !failed {
            drop(s.active.take());
        }
        drop(s);
        let cut = if failed {
            sh.cut_active_to_durable()
                .map(|_| drop(sh.lock().active.take()))
        } else {
            Ok(())
        };
        let opened = cut.and_then(|()| recover(&sh.dir)).and_then(|recovered| {
            let active = create_segment(&sh.dir, recovered.next_segment, recovered.revision)?;
            Ok((recovered, active))
        });
        let (recovered, active) = match opened {
            Ok(o) => o,
            Err(e) => {
                sh.lock().mode = Mode::Failed(format!("reopening the log: {e}"));
                sh.done.notify_all();
                return Err(e);
            }
        };
        if let Some(what) = &recovered.repaired {
            crate::kvd::say(&format!("recovery: {what}"));
        }
        let mut s = sh.lock();
        s.active = Some(active);
        s.map = recovered.map;
        s.assigned = recovered.revision;
        s.durable = recovered.revision;
        s.fingerprint = recovered.fingerprint;
        s.mode = Mode::Open;
        Ok(())
    }

    /// Call `hook` in the committer before each fsync, with the batch's record count.
    #[cfg(test)]
    pub(crate) fn set_before_sync(&self, hook: impl Fn(usize) + Send + Sync + 'static) {
        *self.shared.before_sync.lock().unwrap() = Some(Arc::new(hook));
    }

    /// Make the next fdatasync fail with `errno`, as a disk's error would: the batch is
    /// written (to the page cache), the sync then fails.
    #[cfg(test)]
    pub(crate) fn fail_next_sync(&self, errno: i32) {
        *self.shared.sync_fault.lock().unwrap() = Some(errno);
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.work.notify_all();
        if let Some(committer) = self.committer.take() {
            let _ = committer.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvd::log::record::FRAME;
    use crate::kvd::log::testutil::{append, flip_byte, names, seg};
    use crate::kvd::testutil::TempDir;
    use std::fs::{self, File};

    #[test]
    fn sealed_segments_verify_and_fingerprint() {
        let dir = TempDir::new("sealed");
        let wal = Wal::open(dir.path()).unwrap();
        wal.set("a", "1").unwrap();
        wal.set("b", "2").unwrap();
        wal.freeze();
        assert_eq!(wal.set("c", "3"), Err(SetError::Retry), "frozen");
        let sealed = wal.seal().unwrap();
        assert_eq!(sealed.revision, 2);
        assert_eq!(wal.set("c", "3"), Err(SetError::Retry), "sealed");
        assert_eq!(wal.seal().unwrap(), sealed, "sealing twice changes nothing");

        // A successor opens what was sealed, and finds the same revision and fingerprint.
        let successor = Wal::open(dir.path()).unwrap();
        assert_eq!(successor.revision(), sealed.revision);
        assert_eq!(successor.fingerprint(), sealed.fingerprint);
        assert_eq!(successor.set("c", "3"), Ok(3));
        let sealed2 = successor.seal().unwrap();
        assert_ne!(sealed2.fingerprint, sealed.fingerprint);
        drop(successor);

        // The old incumbent resumes (as after a rollback): reads all, writes a new segment.
        wal.reopen().unwrap();
        assert_eq!(names(&dir), ["seg-1.log", "seg-2.log", "seg-3.log"]);
        assert_eq!(wal.fingerprint(), sealed2.fingerprint);
        assert_eq!(wal.get("c").as_deref(), Some("3"));
        assert_eq!(wal.set("d", "4"), Ok(4));
        drop(wal);

        // Any bit flipped in a sealed segment is caught, and named; nothing is changed.
        let len = fs::metadata(seg(&dir, 1)).unwrap().len() as usize;
        for offset in [0, 5, FRAME + 3, len / 2, len - 1] {
            flip_byte(&seg(&dir, 1), offset);
            let before = fs::read(seg(&dir, 1)).unwrap();
            let e = recover(dir.path()).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            assert!(e.to_string().contains("seg-1.log"), "{e}");
            assert_eq!(fs::read(seg(&dir, 1)).unwrap(), before, "left alone");
            flip_byte(&seg(&dir, 1), offset);
        }
        assert_eq!(recover(dir.path()).unwrap().revision, 4);

        // Bytes after a footer, a missing middle segment, a sealed segment cut short.
        append(&seg(&dir, 1), b"x");
        assert!(recover(dir.path()).is_err());
        fs::write(seg(&dir, 1), &fs::read(seg(&dir, 1)).unwrap()[..len]).unwrap();
        let two = fs::read(seg(&dir, 2)).unwrap();
        fs::remove_file(seg(&dir, 2)).unwrap();
        let e = recover(dir.path()).unwrap_err();
        assert!(
            e.to_string().contains("expected segment 3 from revision 2"),
            "{e}"
        );
        fs::write(seg(&dir, 2), &two[..two.len() - 1]).unwrap();
        let e = recover(dir.path()).unwrap_err();
        assert!(e.to_string().contains("seg-2.log"), "{e}");
        fs::write(seg(&dir, 2), &two).unwrap();
        assert_eq!(recover(dir.path()).unwrap().revision, 4);
    }

    /// A write that fails (here: the segment's handle made read-only; on a full disk,
    /// ENOSPC) is not acknowledged, and neither is any later one, with the error rather than
    /// `retry`; reads go on. A seal then recovers: the acknowledged writes are sealed, and a
    /// successor opens exactly them.
    #[test]
    fn a_failed_log_refuses_writes_and_seals_by_recovery() {
        let dir = TempDir::new("failed");
        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(wal.set("a", "1"), Ok(1));
        assert_eq!(wal.set("b", "2"), Ok(2));
        wal.shared.lock().active.as_mut().unwrap().file =
            Arc::new(File::open(seg(&dir, 1)).unwrap());
        let Err(SetError::Failed(e)) = wal.set("c", "3") else {
            panic!("a failed write was acknowledged")
        };
        assert!(e.starts_with("writing seg-1.log: "), "{e}");
        assert_eq!(wal.set("d", "4"), Err(SetError::Failed(e.clone())));
        assert_eq!(wal.get("a").as_deref(), Some("1"));
        assert_eq!((wal.get("c"), wal.revision()), (None, 2));

        let sealed = wal.seal().unwrap();
        assert_eq!(sealed.revision, 2);
        assert_eq!(wal.set("c", "3"), Err(SetError::Retry), "sealed");
        let successor = Wal::open(dir.path()).unwrap();
        assert_eq!(successor.revision(), 2);
        assert_eq!(successor.fingerprint(), sealed.fingerprint);
        assert_eq!(successor.get("b").as_deref(), Some("2"));
        assert_eq!(successor.set("c", "3"), Ok(3));
    }

    /// A reopen that fails (here: a directory where a segment should be; on a full disk, the
    /// new segment's header) leaves the log failed with that error, not frozen; a seal or a
    /// reopen after the cause is gone succeeds.
    #[test]
    fn a_failed_reopen_leaves_the_log_failed_with_its_error() {
        let dir = TempDir::new("reopen");
        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(wal.set("a", "1"), Ok(1));
        wal.seal().unwrap();
        fs::create_dir(seg(&dir, 2)).unwrap();
        let e = wal.reopen().unwrap_err();
        let Err(SetError::Failed(why)) = wal.set("b", "2") else {
            panic!("a write was accepted without a log")
        };
        assert_eq!(why, format!("reopening the log: {e}"));
        assert_eq!(wal.get("a").as_deref(), Some("1"));
        assert!(wal.seal().is_err(), "the cause is still there");
        fs::remove_dir(seg(&dir, 2)).unwrap();
        assert_eq!(wal.seal().unwrap().revision, 1);
        wal.reopen().unwrap();
        assert_eq!(wal.set("b", "2"), Ok(2));
    }
}
