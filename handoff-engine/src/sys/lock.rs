//! The data-directory lock: an exclusive `flock` on `<dir>/handoff.lock`, and the lock record
//! kept in that same file.
//!
//! # The lock record
//!
//! One text line, space-padded to a fixed [`RECORD_LEN`] bytes so that every rewrite is a
//! single same-length `pwrite` at offset 0 (no truncation window):
//!
//! ```text
//! owner=1234 committed=-                         \n
//! owner=1234 committed=0000000000000003          \n
//! ```
//!
//! `owner` is the decimal pid of the holder; `committed` is `-` or the 16 hex digits of the
//! handoff it committed (as [`HandoffId`]'s `Display` prints it). Readers are strict: anything
//! else (torn, truncated, edited) reads as "no record" (`None`), never as a different record.
//! Because `committed` must be exactly `-` or exactly 16 hex digits, a reader racing
//! [`DataDirLock::mark_committed`] sees the old or the new record, never a partial id. A reader
//! racing the first write of a new holder can in principle see a mix of two owners' digits
//! (Linux does not make `read` atomic against a concurrent `write`); the window is the length
//! of a 48-byte copy, and the protocol treats an unknown owner as "superseded", not as a
//! target to kill.
//!
//! The record is not fsynced. Its readers are the processes that take the lock after its
//! writer (a successor, an incumbent taking it back, a cold start), and the record matters only
//! while a process it names may be alive: on the same running kernel, where the page cache
//! serves every read. After a machine crash nobody it names is alive, `flock`s are gone, and a
//! torn or stale record reads as "no record" or names a dead process, both harmless. This
//! keeps two fsyncs off a handoff's critical path (the successor's acquire and its commit
//! mark; see `BENCHMARKS.md`).
//!
//! `flock` locks belong to the open file description, not to the process: two opens of the
//! lock file in one process conflict like two processes do, and a descriptor inherited over
//! `fork` shares the lock. The lock file is opened close-on-exec, so a spawned successor never
//! inherits the incumbent's lock.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use handoff_proto::{HandoffId, LockRecord, LockResult, Pid};

use crate::sys::proc::{Proven, Unproven};
use rustix::fs::FlockOperation;
use rustix::io::Errno;

use crate::sys::fscheck::{self, Rules, Unsafe};

/// How long [`DataDirLock::acquire_or_break_stale`] waits for a dead holder's lock to go.
pub const STALE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether `pid` (from a lock record) holds the lock on `path` now, as far as can be told: a
/// process proven by its own descriptors to hold it (see [`Proven::lock_holder`]). Exited, or
/// holding none (its pid reused by another process, say): `false`. `/proc/<pid>/fdinfo` not
/// readable: `true`, so that the caller does not wait for a holder it cannot see.
fn owner_holds(pid: Pid, path: &Path) -> bool {
    match Proven::lock_holder(pid, path) {
        Ok(_) => true,
        Err(Unproven::Gone { .. } | Unproven::NotHolder { .. } | Unproven::Other { .. }) => false,
        Err(_) => true,
    }
}

/// Name of the lock file inside the data directory.
pub const LOCK_FILE_NAME: &str = "handoff.lock";

/// Size of the lock record on disk, newline included.
pub const RECORD_LEN: usize = 48;

/// What an existing lock file must be: a regular file of this process's effective uid that
/// nobody else may open (whoever can open it can `flock` it, and so block every handoff and
/// cold start), with a single link (the record is written in place). Its size is not limited:
/// only the first bytes are read, and the file is cut to one record when written.
const RULES: Rules = Rules {
    forbidden_mode: 0o077,
    max_len: None,
    single_link: true,
    others_could: "lock it and so block every handoff and cold start",
    after_remove: " while no process of this daemon runs (it is recreated with mode 0600)",
};

/// The lock file of data directory `dir`.
pub fn lock_file_path(dir: &Path) -> PathBuf {
    dir.join(LOCK_FILE_NAME)
}

/// The data-directory lock, held. Dropping it releases the lock too (the descriptor closes);
/// [`release`](DataDirLock::release) does it explicitly and reports an unlock error.
#[derive(Debug)]
pub struct DataDirLock {
    file: File,
    path: PathBuf,
    record: LockRecord,
    previous: Option<LockRecord>,
}

/// A successful [`try_acquire`].
#[derive(Debug)]
pub struct Acquired {
    /// The lock, with this process's record written.
    pub lock: DataDirLock,
    /// The record the previous holder left, read before ours replaced it; `None` if there was
    /// none or it could not be read.
    pub previous: Option<LockRecord>,
}

impl Acquired {
    /// What to feed the incumbent's `handle_lock`.
    pub fn lock_result(&self) -> LockResult {
        LockResult::Acquired {
            previous: self.previous,
        }
    }
}

/// Why [`try_acquire`] did not take the lock.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// Another open file description (another process, or another open in this one) holds
    /// the lock. `record` is its lock record, when it could be read.
    #[error("data-directory lock is held{}", match record {
        Some(r) => format!(" by pid {}", r.owner),
        None => " (holder unknown)".to_string(),
    })]
    Held {
        /// The holder's record, best-effort.
        record: Option<LockRecord>,
    },
    /// The recorded owner does not hold the lock (it exited, or its pid is another process's
    /// now) but the lock stayed held: some other process holds a descriptor of the lock file
    /// (inherited, or opened by hand).
    #[error("data-directory lock is held though its recorded owner {owner} does not hold it (exited, or its pid is another process now); pids that took a lock on it per /proc/locks (they may have exited since): {holders:?}")]
    Stale {
        /// The owner named by the lock record.
        owner: Pid,
        /// Pids that took a lock on the file, from `/proc/locks`.
        holders: Vec<Pid>,
    },
    /// Opening, locking, reading or writing the lock file failed.
    #[error("data-directory lock {}: {source}", path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
    /// The lock file or the data directory is not one this process may trust (a link, a FIFO,
    /// another uid's, a mode that lets others open it, a second hard link, a directory others
    /// may write): refused, and left as it is.
    #[error("data-directory lock {0}")]
    Unsafe(Unsafe),
}

impl LockError {
    /// What to feed the incumbent's `handle_lock`, for [`LockError::Held`]. `None` for an I/O
    /// failure, which the driver must report rather than treat as "held".
    pub fn lock_result(&self) -> Option<LockResult> {
        match self {
            LockError::Held { record } => Some(LockResult::Held(*record)),
            LockError::Stale { .. } | LockError::Io { .. } | LockError::Unsafe(_) => None,
        }
    }
}

/// Try once, without blocking, to take the exclusive lock on `<dir>/handoff.lock`. On success,
/// read the previous record, then write `owner=<our pid> committed=-`.
///
/// The file is reached through `dir`, opened once and checked (this uid's or root's, not
/// writable by others unless sticky), created with mode 0600 if missing, opened
/// `O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC`, and checked before and after the open: a regular
/// file of this process's effective uid, with one link and no permission for group or others.
/// Anything else is [`LockError::Unsafe`], and is left as it is.
pub fn try_acquire(dir: &Path) -> Result<Acquired, LockError> {
    let path = lock_file_path(dir);
    let io_err = |source: io::Error| match Unsafe::of(&source) {
        Some(u) => LockError::Unsafe(u.clone()),
        None => LockError::Io {
            path: path.clone(),
            source,
        },
    };
    let (fd, _) = fscheck::open_or_create(&path, &RULES).map_err(io_err)?;
    let file = File::from(fd);
    loop {
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => break,
            Err(Errno::INTR) => continue,
            Err(Errno::WOULDBLOCK) => {
                return Err(LockError::Held {
                    record: read_record(&file),
                })
            }
            Err(e) => return Err(io_err(e.into())),
        }
    }
    let previous = read_record(&file);
    let record = LockRecord {
        owner: std::process::id(),
        committed: None,
    };
    write_record(&file, &record).map_err(io_err)?;
    Ok(Acquired {
        lock: DataDirLock {
            file,
            path,
            record,
            previous,
        },
        previous,
    })
}

impl DataDirLock {
    /// Take the lock on data directory `dir` without waiting: `<dir>/handoff.lock`, with this
    /// process's pid recorded. Fails with [`LockError::Held`] (naming the holder) if another
    /// process holds it.
    ///
    /// A successor calls this after `wait_for_begin`, when the incumbent has released the
    /// lock, so it succeeds unless something other than the protocol holds the directory.
    pub fn acquire(dir: &Path) -> Result<DataDirLock, LockError> {
        let lock = try_acquire(dir)?.lock;
        crate::crash::successor_point("successor.lock_taken");
        Ok(lock)
    }

    /// Take the lock for a cold start, when the recorded holder may have just died.
    ///
    /// A `flock` is released by the kernel when its holder's last descriptor closes, so a
    /// dead holder normally leaves the lock free. It can stay held a little longer while the
    /// dying process is torn down, or for good if a child inherited the descriptor. So: if the
    /// lock is held and the pid in the lock record does not hold it (it exited, or the pid
    /// names another process now: checked through that process's own descriptors, never by
    /// its pid alone), retry for up to [`STALE_WAIT`]; if that pid holds it (or the record is
    /// unreadable), fail at once with [`LockError::Held`]. A lock that stays held while its
    /// recorded owner does not hold it is reported with the pids `/proc/locks` shows
    /// ([`LockError::Stale`]). No holder is ever broken.
    pub fn acquire_or_break_stale(dir: &Path) -> Result<DataDirLock, LockError> {
        let until = std::time::Instant::now() + STALE_WAIT;
        loop {
            match try_acquire(dir) {
                Ok(a) => return Ok(a.lock),
                Err(LockError::Held { record: Some(rec) })
                    if !owner_holds(rec.owner, &lock_file_path(dir)) =>
                {
                    if std::time::Instant::now() >= until {
                        let holders = holders(&lock_file_path(dir)).unwrap_or_default();
                        return Err(LockError::Stale {
                            owner: rec.owner,
                            holders,
                        });
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The lock record the previous holder left, read when this lock was taken.
    pub fn previous(&self) -> Option<LockRecord> {
        self.previous
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The record as last written by this holder.
    pub fn record(&self) -> LockRecord {
        self.record
    }

    /// Record that this holder committed `handoff` (the successor does this before it
    /// acknowledges `Commit`); written in place before returning (see the module's
    /// documentation for why no fsync).
    pub fn mark_committed(&mut self, handoff: HandoffId) -> io::Result<()> {
        let record = LockRecord {
            owner: self.record.owner,
            committed: Some(handoff),
        };
        write_record(&self.file, &record)?;
        self.record = record;
        Ok(())
    }

    /// Unlock and close. The record stays in the file for the next holder to read.
    pub fn release(self) -> io::Result<()> {
        rustix::fs::flock(&self.file, FlockOperation::Unlock)?;
        drop(self.file);
        Ok(())
    }
}

fn format_record(rec: &LockRecord) -> [u8; RECORD_LEN] {
    let committed = match rec.committed {
        Some(id) => id.to_string(),
        None => "-".to_string(),
    };
    let text = format!("owner={} committed={committed}", rec.owner);
    let mut out = [b' '; RECORD_LEN];
    // At most 6 + 10 + 11 + 16 = 43 bytes, so the newline always fits.
    out[..text.len()].copy_from_slice(text.as_bytes());
    out[RECORD_LEN - 1] = b'\n';
    out
}

/// Parse a record file's content; `None` unless it is exactly one well-formed line.
fn parse_record(bytes: &[u8]) -> Option<LockRecord> {
    let text = std::str::from_utf8(bytes).ok()?;
    let line = text.strip_suffix('\n')?;
    if line.contains('\n') {
        return None;
    }
    let line = line.trim_end_matches(' ');
    let (owner, committed) = line.split_once(' ')?;
    let owner = owner.strip_prefix("owner=")?;
    let committed = committed.strip_prefix("committed=")?;
    if owner.is_empty() || owner.len() > 10 || !owner.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let owner: Pid = owner.parse().ok()?;
    if owner == 0 {
        return None;
    }
    let committed = if committed == "-" {
        None
    } else if committed.len() == 16 && committed.bytes().all(|b| b.is_ascii_hexdigit()) {
        Some(HandoffId(u64::from_str_radix(committed, 16).ok()?))
    } else {
        return None;
    };
    Some(LockRecord { owner, committed })
}

/// Best-effort read of the record: any failure is `None`.
fn read_record(file: &File) -> Option<LockRecord> {
    // Room for one byte more than a record (or a hand-written unpadded one) can need.
    let mut buf = [0u8; 2 * RECORD_LEN];
    let mut len = 0;
    while len < buf.len() {
        match file.read_at(&mut buf[len..], len as u64) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
    }
    if len == buf.len() {
        return None; // Far longer than any record.
    }
    parse_record(&buf[..len])
}

fn write_record(file: &File, rec: &LockRecord) -> io::Result<()> {
    let bytes = format_record(rec);
    file.write_all_at(&bytes, 0)?;
    if file.metadata()?.len() != RECORD_LEN as u64 {
        file.set_len(RECORD_LEN as u64)?;
    }
    Ok(())
}

/// Whether process `pid` holds a `flock` on the file at `path`, according to `/proc/locks`.
///
/// Guards a kill of the holder named by a lock record: a pid that was reused by an unrelated
/// process holds no lock on our lock file, so it is never hit. Matches `FLOCK` entries (shared
/// or exclusive) whose device (`/proc/locks` prints `major:minor` in hex) and inode equal those
/// of `path`; waiters (`->` lines) do not count.
///
/// `/proc/locks` is a `seq_file`: each `read` takes a consistent snapshot of at most one
/// kernel buffer (a page) of whole lines, and the next `read` resumes *by line index*, so a
/// lock released meanwhile anywhere on the system can make a later line be skipped. It is
/// therefore read with large buffers (never a small first probe, which would split even a
/// short file across two snapshots), and a miss is confirmed by [`PROC_LOCKS_SCANS`] scans.
/// A hit is always real (as of that snapshot).
///
/// Limits: `/proc/locks` shows the pid that *took* the lock, even after that process exited
/// while another one (which inherited the descriptor) holds the lock on, so a hit may name a
/// dead process, or whoever got its pid since; pids are as seen from this process's pid
/// namespace; and on a filesystem whose `st_dev` differs from its superblock's device (a btrfs
/// subvolume) it never matches. So this is a diagnostic, not a proof that `pid` holds the lock:
/// [`kill_if_holder`] does not rely on it.
pub fn holds_lock(pid: Pid, path: &Path) -> io::Result<bool> {
    let st = rustix::fs::stat(path)?;
    let dev = st.st_dev;
    holds_flock(
        pid,
        rustix::fs::major(dev),
        rustix::fs::minor(dev),
        st.st_ino,
    )
}

/// [`holds_lock`] for the file `/proc/locks` names `major:minor:ino` (the device numbers as
/// it prints them, in hex there).
pub(crate) fn holds_flock(pid: Pid, major: u32, minor: u32, ino: u64) -> io::Result<bool> {
    for _ in 0..PROC_LOCKS_SCANS {
        let locks = read_proc_locks()?;
        if proc_locks_has_flock(&locks, pid, major, minor, ino) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// SIGKILL `pid` if, and only if, it holds a lock on the file at `path`: `Ok(true)` if it was
/// killed, `Ok(false)` if it has exited or holds none (a reused pid is never hit).
///
/// Proven by the process's own descriptors, not by `/proc/locks` (which names whoever took
/// the lock, possibly long gone): a pidfd is opened on `pid`, its `/proc/<pid>/fdinfo` must
/// show an open file description holding a `flock` on the file, the pidfd's process must still
/// be alive after that scan, and the signal goes through that pidfd
/// ([`Proven::lock_holder`]). An error (the process cannot be inspected, say) kills nobody.
pub fn kill_if_holder(pid: Pid, path: &Path) -> io::Result<bool> {
    match Proven::lock_holder(pid, path) {
        Ok(holder) => {
            holder.kill()?;
            Ok(true)
        }
        Err(Unproven::Gone { .. } | Unproven::NotHolder { .. } | Unproven::Other { .. }) => {
            Ok(false)
        }
        Err(Unproven::Io { source, .. }) => Err(source),
    }
}

/// The pids `/proc/locks` shows holding a `flock` on the file at `path` (one scan).
pub fn holders(path: &Path) -> io::Result<Vec<Pid>> {
    let st = rustix::fs::stat(path)?;
    flock_holders(
        rustix::fs::major(st.st_dev),
        rustix::fs::minor(st.st_dev),
        st.st_ino,
    )
}

/// [`holders`] of the file `/proc/locks` names `major:minor:ino` (one scan).
pub(crate) fn flock_holders(major: u32, minor: u32, ino: u64) -> io::Result<Vec<Pid>> {
    let locks = read_proc_locks()?;
    let mut pids: Vec<Pid> = locks
        .lines()
        .filter_map(parse_flock_line)
        .filter(|&(_, ma, mi, i)| (ma, mi, i) == (major, minor, ino))
        .map(|(pid, ..)| pid)
        .collect();
    pids.sort_unstable();
    pids.dedup();
    Ok(pids)
}

/// How many scans of `/proc/locks` [`holds_lock`] makes before it answers `false`.
pub const PROC_LOCKS_SCANS: usize = 3;

fn read_proc_locks() -> io::Result<String> {
    use std::io::Read;
    let mut file = File::open("/proc/locks")?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut len = 0;
    loop {
        if buf.len() - len < 32 * 1024 {
            buf.resize(buf.len() * 2, 0);
        }
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// One `/proc/locks` line, for example `1: FLOCK  ADVISORY  WRITE 1234 00:2e:5678 0 EOF`:
/// `(pid, major, minor, inode)` if it is a held `FLOCK`.
pub(crate) fn parse_flock_line(line: &str) -> Option<(Pid, u32, u32, u64)> {
    let mut t = line.split_whitespace();
    t.next()?.strip_suffix(':')?;
    let kind = t.next()?;
    if kind != "FLOCK" {
        return None; // Also skips "->" (a blocked waiter) and POSIX/OFDLCK/LEASE entries.
    }
    let _advisory = t.next()?;
    let mode = t.next()?;
    if mode != "WRITE" && mode != "READ" {
        return None;
    }
    let pid: Pid = t.next()?.parse().ok()?;
    let mut dev = t.next()?.split(':');
    let major = u32::from_str_radix(dev.next()?, 16).ok()?;
    let minor = u32::from_str_radix(dev.next()?, 16).ok()?;
    let ino: u64 = dev.next()?.parse().ok()?;
    if dev.next().is_some() {
        return None;
    }
    Some((pid, major, minor, ino))
}

fn proc_locks_has_flock(locks: &str, pid: Pid, major: u32, minor: u32, ino: u64) -> bool {
    locks
        .lines()
        .filter_map(parse_flock_line)
        .any(|l| l == (pid, major, minor, ino))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::testutil::{is_cloexec, root, TempDir};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn me() -> Pid {
        std::process::id()
    }

    #[test]
    fn acquire_refuse_release_reacquire() {
        let dir = TempDir::new("lock");
        let first = try_acquire(dir.path()).unwrap();
        assert_eq!(first.previous, None);
        assert_eq!(first.lock_result(), LockResult::Acquired { previous: None });
        let lock = first.lock;
        assert!(is_cloexec(&lock.file));
        let meta = std::fs::metadata(lock.path()).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let mine = LockRecord {
            owner: me(),
            committed: None,
        };
        assert_eq!(lock.record(), mine);

        // A second open file description conflicts, even in the same process.
        let err = try_acquire(dir.path()).unwrap_err();
        assert!(
            matches!(err, LockError::Held { record: Some(r) } if r == mine),
            "{err:?}"
        );
        assert_eq!(err.lock_result(), Some(LockResult::Held(Some(mine))));
        assert_eq!(
            err.to_string(),
            format!("data-directory lock is held by pid {}", me())
        );

        lock.release().unwrap();
        let again = try_acquire(dir.path()).unwrap();
        assert_eq!(again.previous, Some(mine));
    }

    #[test]
    fn committed_mark_is_visible_to_readers() {
        let dir = TempDir::new("lock-commit");
        let mut lock = try_acquire(dir.path()).unwrap().lock;
        lock.mark_committed(HandoffId(3)).unwrap();
        let marked = LockRecord {
            owner: me(),
            committed: Some(HandoffId(3)),
        };
        assert_eq!(lock.record(), marked);
        // Through the file, as text.
        let text = std::fs::read_to_string(lock.path()).unwrap();
        assert_eq!(text.len(), RECORD_LEN);
        assert_eq!(
            text.trim_end(),
            format!("owner={} committed=0000000000000003", me())
        );
        // Through a refused attempt.
        match try_acquire(dir.path()) {
            Err(LockError::Held { record }) => assert_eq!(record, Some(marked)),
            other => panic!("expected Held, got {other:?}"),
        }
        // And as the previous record of the next holder, which then writes its own.
        drop(lock);
        let next = try_acquire(dir.path()).unwrap();
        assert_eq!(next.previous, Some(marked));
        let text = std::fs::read_to_string(next.lock.path()).unwrap();
        assert_eq!(text.trim_end(), format!("owner={} committed=-", me()));
    }

    #[test]
    fn garbage_records_read_as_none() {
        let dir = TempDir::new("lock-garbage");
        let path = lock_file_path(dir.path());
        // Written by hand, as its owner would: with no access for others.
        drop(try_acquire(dir.path()).unwrap());
        for garbage in [
            &b""[..],
            b"\0\0\0\0",
            b"owner=12 committed=-", // no newline
            b"owner=12 committed=-\nowner=13 committed=-\n",
            b"owner=0 committed=-\n",
            b"owner=+12 committed=-\n",
            b"owner=12 committed=00000003\n", // id not 16 digits
            b"owner=12 committed=+000000000000003\n",
            b"owner=99999999999 committed=-\n", // not a u32
            b"owner=12  committed=-\n",
            b"\xff\xfe owner=12 committed=-\n",
        ] {
            std::fs::write(&path, garbage).unwrap();
            let got = try_acquire(dir.path()).unwrap();
            assert_eq!(got.previous, None, "{garbage:?}");
            got.lock.release().unwrap();
        }
        // A huge file is not read whole.
        std::fs::write(&path, vec![b'x'; 1 << 20]).unwrap();
        let got = try_acquire(dir.path()).unwrap();
        assert_eq!(got.previous, None);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), RECORD_LEN as u64);
        got.lock.release().unwrap();

        // Hand-written, unpadded records are accepted.
        std::fs::write(&path, b"owner=12 committed=00000000000000ff\n").unwrap();
        let got = try_acquire(dir.path()).unwrap();
        assert_eq!(
            got.previous,
            Some(LockRecord {
                owner: 12,
                committed: Some(HandoffId(255))
            })
        );
        got.lock.release().unwrap();

        // Held by someone who wrote garbage: Held with no record.
        std::fs::write(&path, b"garbage\n").unwrap();
        let other = File::options().read(true).write(true).open(&path).unwrap();
        rustix::fs::flock(&other, FlockOperation::NonBlockingLockExclusive).unwrap();
        let err = try_acquire(dir.path()).unwrap_err();
        assert!(matches!(err, LockError::Held { record: None }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "data-directory lock is held (holder unknown)"
        );
    }

    #[test]
    fn record_format_round_trips() {
        for rec in [
            LockRecord {
                owner: 1,
                committed: None,
            },
            LockRecord {
                owner: u32::MAX,
                committed: Some(HandoffId(u64::MAX)),
            },
            LockRecord {
                owner: 4_194_304,
                committed: Some(HandoffId(0)),
            },
        ] {
            let bytes = format_record(&rec);
            assert_eq!(parse_record(&bytes), Some(rec));
            // Any truncation is rejected, never misread.
            for cut in 0..bytes.len() {
                assert_eq!(parse_record(&bytes[..cut]), None, "cut at {cut}");
            }
        }
    }

    #[test]
    fn holds_lock_follows_the_flock() {
        let dir = TempDir::new("lock-proc");
        let lock = try_acquire(dir.path()).unwrap().lock;
        let path = lock.path().to_path_buf();
        assert!(holds_lock(me(), &path).unwrap());
        // Another pid does not hold it (pid 1 is init, never us in a test).
        assert!(!holds_lock(1, &path).unwrap());
        // A refused attempt leaves no entry that counts.
        assert!(try_acquire(dir.path()).is_err());
        lock.release().unwrap();
        assert!(!holds_lock(me(), &path).unwrap());
        // A missing file is an error, not "false".
        assert!(holds_lock(me(), &dir.path().join("missing")).is_err());
    }

    #[test]
    fn proc_locks_lines() {
        let text = "\
1: POSIX  ADVISORY  WRITE 1234 00:2e:5678 0 EOF
2: FLOCK  ADVISORY  WRITE 1234 fd:01:5679 0 EOF
2: -> FLOCK  ADVISORY  WRITE 4321 fd:01:5679 0 EOF
3: OFDLCK ADVISORY  READ  -1 00:2e:5678 0 EOF
4: FLOCK  ADVISORY  READ  77 103:0a:42 0 EOF
garbage
";
        assert!(proc_locks_has_flock(text, 1234, 0xfd, 1, 5679));
        assert!(!proc_locks_has_flock(text, 1234, 0, 0x2e, 5678)); // POSIX lock only
        assert!(!proc_locks_has_flock(text, 4321, 0xfd, 1, 5679)); // only waiting
        assert!(!proc_locks_has_flock(text, 1234, 0xfd, 1, 5678)); // other inode
        assert!(!proc_locks_has_flock(text, 1234, 0xfe, 1, 5679)); // other device
        assert!(proc_locks_has_flock(text, 77, 0x103, 0x0a, 42));
        assert_eq!(
            parse_flock_line("1: FLOCK  ADVISORY  WRITE 1234 00:2e:5678 0 EOF"),
            Some((1234, 0, 0x2e, 5678))
        );
    }

    /// `try_acquire` refuses the lock file as it is, saying `says`, and leaves it unchanged.
    fn refused(dir: &Path, says: &str) -> String {
        let path = lock_file_path(dir);
        let before = std::fs::symlink_metadata(&path).unwrap();
        let content = || {
            // Never open a FIFO here: that would block.
            let regular = std::fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_file();
            regular.then(|| std::fs::read(&path).unwrap())
        };
        let before_content = content();
        let err = try_acquire(dir).expect_err("an unsafe lock file was used");
        assert!(matches!(err, LockError::Unsafe(_)), "{err:?}");
        let msg = err.to_string();
        eprintln!("{msg}");
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains(says),
            "{msg}"
        );
        assert_eq!(err.lock_result(), None, "{msg}");
        let after = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(
            (before.ino(), before.mode(), before.uid(), before.len()),
            (after.ino(), after.mode(), after.uid(), after.len())
        );
        assert_eq!(content(), before_content);
        msg
    }

    #[test]
    fn a_lock_file_others_may_open_is_refused() {
        let dir = TempDir::new("lock-mode");
        let path = lock_file_path(dir.path());
        std::fs::write(&path, b"owner=12 committed=-\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        // Anyone who can open it can flock it: refused, naming the mode and the fix.
        let msg = refused(dir.path(), "mode 0644");
        assert!(msg.contains("chmod 600"), "{msg}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let got = try_acquire(dir.path()).unwrap();
        assert_eq!(got.previous.map(|r| r.owner), Some(12));
    }

    #[test]
    fn a_lock_file_of_another_uid_is_refused() {
        if !root(
            "a_lock_file_of_another_uid_is_refused",
            "a lock file chowned to another uid",
        ) {
            return;
        }
        let dir = TempDir::new("lock-owner");
        let path = lock_file_path(dir.path());
        drop(try_acquire(dir.path()).unwrap());
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        refused(dir.path(), "owned by uid 65534");
    }

    #[test]
    fn a_lock_file_that_is_a_link_or_a_fifo_is_refused() {
        let dir = TempDir::new("lock-kinds");
        let path = lock_file_path(dir.path());
        let victim = dir.path().join("victim");
        std::fs::write(
            &victim,
            b"precious, and longer than a lock record is. ".repeat(4),
        )
        .unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
        let victim_bytes = std::fs::read(&victim).unwrap();

        std::os::unix::fs::symlink(&victim, &path).unwrap();
        refused(dir.path(), "is a symbolic link");
        std::fs::remove_file(&path).unwrap();

        // A second name of another file: writing the record would truncate that file.
        std::fs::hard_link(&victim, &path).unwrap();
        refused(dir.path(), "2 links");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), victim_bytes);

        rustix::fs::mknodat(
            rustix::fs::CWD,
            &path,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
            0,
        )
        .unwrap();
        refused(dir.path(), "FIFO");
        std::fs::remove_file(&path).unwrap();
        try_acquire(dir.path()).unwrap();
    }

    #[test]
    fn a_data_directory_others_may_write_is_refused() {
        let dir = TempDir::new("lock-dir");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = try_acquire(&data).expect_err("used a lock in a world-writable directory");
        assert!(matches!(err, LockError::Unsafe(_)), "{err:?}");
        let msg = err.to_string();
        eprintln!("{msg}");
        assert!(
            msg.contains(&data.display().to_string())
                && msg.contains("writable by group or others"),
            "{msg}"
        );
        assert!(!lock_file_path(&data).exists());
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        try_acquire(&data).unwrap();
    }
}
