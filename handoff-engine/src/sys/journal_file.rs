//! The supervisor's journal on disk: replaced atomically, read back strictly.
//!
//! [`write_atomic`] writes `<path>.tmp`, fsyncs it and renames it over `<path>`, so after a
//! crash at any point `<path>` holds either the old record or the new one, complete. A
//! `<path>.tmp` left by a crash is never read; the next write replaces it.
//!
//! # What it survives
//!
//! - **A process crash** (the supervisor, or any daemon): the rename is atomic and the page
//!   cache outlives the process, so the new record is what a restarted supervisor reads from
//!   the moment `rename` returned.
//! - **A machine crash** (power loss, kernel panic): the fsync before the rename means the
//!   journal is never torn or empty, so the supervisor always starts. The directory is *not*
//!   fsynced after the rename, so the rename itself may be lost and the journal hold the
//!   record before. That is harmless: after a machine crash no process that either record
//!   names is alive, so recovery finds nobody serving and starts the daemon cold from its data
//!   directory, whichever record it read. (The daemon's acknowledged writes are the daemon's
//!   own fsyncs' business.) Skipping that fsync takes one of the two fsyncs off every record,
//!   two of which are on a handoff's critical path (see `BENCHMARKS.md`).

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use handoff_proto::journal::{self, Journal, JournalError};
use handoff_proto::JournalRecord;
use rustix::fs::{Mode, OFlags};

use crate::sys::fscheck::{self, Dir, Rules, Unsafe};

/// The largest journal file read: a record takes less than a hundred bytes.
pub const MAX_JOURNAL_LEN: u64 = 1 << 20;

/// What the journal must be: a regular file of this process's effective uid with a single
/// link, writable by nobody else, at most [`MAX_JOURNAL_LEN`] bytes.
const RULES: Rules = Rules {
    forbidden_mode: 0o022,
    max_len: Some(MAX_JOURNAL_LEN),
    single_link: true,
    others_could: "change what the supervisor's recovery believes",
    after_remove: " (the supervisor then recovers without a journal, from whoever answers the \
                   control socket)",
};

/// A journal that could not be written or read back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalFileError {
    /// A system call failed.
    #[error("journal {}: {source}", path.display())]
    Io {
        /// The file concerned (the journal, its temporary file or its directory).
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
    /// The file exists but does not hold a valid record (truncated, damaged, foreign).
    #[error("journal {}: {source}", path.display())]
    Decode {
        /// The journal.
        path: PathBuf,
        /// What is wrong with its content.
        source: JournalError,
    },
    /// The journal, its temporary file or its directory is not one this process may trust
    /// (a symbolic link, a FIFO or device, another uid's, writable by others, too large, in a
    /// directory others may write): nothing was read or written, and it is left as it is.
    #[error("journal {0}")]
    Unsafe(Unsafe),
}

/// `<path>.tmp`.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(".tmp");
    PathBuf::from(s)
}

fn io_at(path: &Path) -> impl Fn(io::Error) -> JournalFileError + '_ {
    move |source| match Unsafe::of(&source) {
        Some(u) => JournalFileError::Unsafe(u.clone()),
        None => JournalFileError::Io {
            path: path.to_path_buf(),
            source,
        },
    }
}

/// Replace the file at `path` with `bytes`: write `<path>.tmp`, fsync it, rename it over
/// `path`. Returns once the new content survives a crash of any process; after a machine crash
/// the file holds the new content or the old, complete (see the module's documentation).
///
/// Everything happens relative to `path`'s directory, opened once and checked (this uid's or
/// root's, not writable by others unless sticky: [`JournalFileError::Unsafe`] otherwise). The
/// temporary file is created `O_CREAT | O_EXCL | O_NOFOLLOW`, mode 0600, so nothing already
/// at its name is ever written through: a leftover of this uid (a crash's partial record, or
/// a link or FIFO planted there) is removed first without being followed; one of another uid
/// is refused.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), JournalFileError> {
    write_atomic_with(path, bytes, || {})
}

/// [`write_atomic`], calling `before_rename` once the temporary file is written and fsynced
/// (the supervisor's engine puts a crash point there).
pub fn write_atomic_with(
    path: &Path,
    bytes: &[u8],
    before_rename: impl FnOnce(),
) -> Result<(), JournalFileError> {
    let tmp = tmp_path(path);
    let (dir, name) = Dir::of(path).map_err(io_at(path))?;
    let tmp_name = tmp.file_name().expect("<name>.tmp has a file name");
    dir.remove_ours(tmp_name, "the journal's temporary file")
        .map_err(io_at(&tmp))?;
    let fd = rustix::fs::openat(
        dir.fd(),
        tmp_name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::RUSR | Mode::WUSR,
    )
    .map_err(|e| io_at(&tmp)(e.into()))?;
    // The umask may have removed bits: set ours.
    rustix::fs::fchmod(&fd, Mode::RUSR | Mode::WUSR).map_err(|e| io_at(&tmp)(e.into()))?;
    let mut file = File::from(fd);
    file.write_all(bytes).map_err(io_at(&tmp))?;
    file.sync_all().map_err(io_at(&tmp))?;
    drop(file);
    before_rename();
    rustix::fs::renameat(dir.fd(), tmp_name, dir.fd(), name).map_err(|e| io_at(path)(e.into()))?;
    Ok(())
}

/// Encode `record` and [`write_atomic`] it.
pub fn write(path: &Path, record: &JournalRecord) -> Result<(), JournalFileError> {
    write_atomic(path, &journal::encode(record))
}

/// The bytes of the journal at `path`, checked before they are read: `Ok(None)` if there is no
/// file (or no directory). [`JournalFileError::Unsafe`] if the file or its directory is not one
/// to trust (see [`write_atomic`] for the directory; the file must be a regular file of this
/// uid, not a link, writable by nobody else, with one link, at most [`MAX_JOURNAL_LEN`] bytes).
/// A FIFO never blocks this and a device is never opened.
pub fn read_bytes(path: &Path) -> Result<Option<Vec<u8>>, JournalFileError> {
    let (dir, name) = match Dir::of(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_at(path)(e)),
    };
    let Some(file) = fscheck::open_read(&dir, name, &RULES).map_err(io_at(path))? else {
        return Ok(None);
    };
    fscheck::read_bounded(file, path, &RULES)
        .map(Some)
        .map_err(io_at(path))
}

/// Move the journal at `path` aside, to `<path>.<suffix>` (or `<path>.<suffix>-1`, `-2`, … if
/// that name is taken), within its checked directory and without replacing anything; the new
/// path. For a journal that does not decode, kept for a post-mortem.
pub fn set_aside(path: &Path, suffix: &str) -> Result<PathBuf, JournalFileError> {
    let (dir, name) = Dir::of(path).map_err(io_at(path))?;
    for n in 0..100 {
        let mut aside = name.to_os_string();
        aside.push(".");
        aside.push(suffix);
        if n > 0 {
            aside.push(format!("-{n}"));
        }
        let to = dir.join(&aside);
        let renamed = match rustix::fs::renameat_with(
            dir.fd(),
            name,
            dir.fd(),
            &aside,
            rustix::fs::RenameFlags::NOREPLACE,
        ) {
            // A filesystem without renameat2's flags: look, then rename.
            Err(rustix::io::Errno::INVAL) => match dir.stat(&aside).map_err(io_at(&to))? {
                Some(_) => Err(rustix::io::Errno::EXIST),
                None => rustix::fs::renameat(dir.fd(), name, dir.fd(), &aside),
            },
            r => r,
        };
        match renamed {
            Ok(()) => return Ok(to),
            Err(rustix::io::Errno::EXIST) => continue,
            Err(e) => return Err(io_at(path)(e.into())),
        }
    }
    Err(io_at(path)(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("100 names {}.{suffix}-* are taken", path.display()),
    )))
}

/// Read the journal at `path` ([`read_bytes`]): `Ok(None)` if there is no file, the record and
/// the identities of its pids if it decodes (either format), and [`JournalFileError::Decode`]
/// (never a panic) if it does not.
pub fn read(path: &Path) -> Result<Option<Journal>, JournalFileError> {
    let Some(bytes) = read_bytes(path)? else {
        return Ok(None);
    };
    journal::decode_journal(&bytes)
        .map(Some)
        .map_err(|source| JournalFileError::Decode {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::testutil::{root, TempDir};
    use handoff_proto::HandoffId;
    use std::os::unix::fs::PermissionsExt;

    /// The record of the journal at `path`.
    fn read_record(path: &Path) -> Result<Option<JournalRecord>, JournalFileError> {
        read(path).map(|j| j.map(|j| j.record))
    }

    fn records() -> [JournalRecord; 3] {
        [
            JournalRecord::Idle {
                serving: Some(41),
                last_handoff: HandoffId(6),
            },
            JournalRecord::InFlight {
                handoff: HandoffId(7),
                incumbent: 41,
                successor: 42,
            },
            JournalRecord::Committing {
                handoff: HandoffId(7),
                incumbent: 41,
                successor: 42,
            },
        ]
    }

    #[test]
    fn round_trip_and_replacement() {
        let dir = TempDir::new("journal");
        let path = dir.path().join("journal");
        assert_eq!(read_record(&path).unwrap(), None);
        for rec in records() {
            write(&path, &rec).unwrap();
            assert_eq!(read_record(&path).unwrap(), Some(rec));
            assert!(!tmp_path(&path).exists());
        }
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A missing directory is "no journal" too.
        assert_eq!(
            read_record(&dir.path().join("nonexistent/journal")).unwrap(),
            None
        );
    }

    #[test]
    fn identities_come_back_with_the_record() {
        let dir = TempDir::new("journal-ids");
        let path = dir.path().join("journal");
        let [_, rec, _] = records();
        let id = handoff_proto::ProcessIdentity {
            boot_id: [7; 16],
            start_ticks: 99,
            pidfd_inode: Some(1234),
        };
        write_atomic(&path, &journal::encode_journal(&rec, &[(42, id)])).unwrap();
        let j = read(&path).unwrap().unwrap();
        assert_eq!((&j.record, j.format), (&rec, 2));
        assert_eq!(j.identity(42), Some(id));
        assert_eq!(j.identity(41), None);
    }

    #[test]
    fn truncated_or_damaged_files_are_errors() {
        let dir = TempDir::new("journal-trunc");
        let path = dir.path().join("journal");
        let bytes = journal::encode(&records()[1]);
        for cut in 0..bytes.len() {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let err = read_record(&path).unwrap_err();
            assert!(
                matches!(
                    err,
                    JournalFileError::Decode {
                        source: JournalError::Truncated { .. },
                        ..
                    }
                ),
                "cut at {cut}: {err:?}"
            );
            let msg = err.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains("truncated"), "{msg}");
        }
        std::fs::write(&path, b"not a journal at all").unwrap();
        assert!(matches!(
            read_record(&path),
            Err(JournalFileError::Decode {
                source: JournalError::BadMagic,
                ..
            })
        ));
        // A directory in its place is refused, naming the path.
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let err = read_record(&sub).unwrap_err();
        assert!(matches!(err, JournalFileError::Unsafe(_)), "{err:?}");
        assert!(err.to_string().contains(&sub.display().to_string()));
        assert!(err.to_string().contains("is a directory"), "{err}");
    }

    #[test]
    fn leftover_tmp_from_a_crash_is_ignored() {
        let dir = TempDir::new("journal-tmp");
        let path = dir.path().join("journal");
        let [first, second, _] = records();
        write(&path, &first).unwrap();
        // A crash after writing part of the next record into the temporary file (with a
        // looser mode than ours).
        let partial = journal::encode(&second);
        std::fs::write(tmp_path(&path), &partial[..partial.len() / 2]).unwrap();
        std::fs::set_permissions(tmp_path(&path), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(read_record(&path).unwrap(), Some(first));
        // The next write replaces the leftover and leaves none behind.
        write(&path, &second).unwrap();
        assert_eq!(read_record(&path).unwrap(), Some(second));
        assert!(!tmp_path(&path).exists());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A leftover with no journal at all still reads as "no journal".
        let other = dir.path().join("other");
        std::fs::write(tmp_path(&other), b"HOJ1").unwrap();
        assert_eq!(read_record(&other).unwrap(), None);
    }

    /// Run `f` on a thread and wait at most 5 s for it: a call that blocks is the failure.
    fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("{what}: still blocked after 5 s"))
    }

    fn mkfifo(path: &Path) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            path,
            rustix::fs::FileType::Fifo,
            Mode::RUSR | Mode::WUSR,
            0,
        )
        .unwrap();
    }

    fn refused(r: Result<Option<JournalRecord>, JournalFileError>, path: &Path, says: &str) {
        let err = r.expect_err("an unsafe journal was read");
        assert!(matches!(err, JournalFileError::Unsafe(_)), "{err:?}");
        let msg = err.to_string();
        eprintln!("{msg}");
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains(says),
            "{msg}"
        );
    }

    #[test]
    fn a_fifo_journal_is_refused_without_blocking() {
        let dir = TempDir::new("journal-fifo");
        let path = dir.path().join("journal");
        mkfifo(&path);
        let p = path.clone();
        refused(
            bounded("reading a FIFO", move || read_record(&p)),
            &path,
            "FIFO",
        );
    }

    #[test]
    fn a_symlinked_journal_is_refused() {
        let dir = TempDir::new("journal-symlink");
        let real = dir.path().join("elsewhere");
        write(&real, &records()[0]).unwrap();
        let path = dir.path().join("journal");
        std::os::unix::fs::symlink(&real, &path).unwrap();
        refused(read_record(&path), &path, "is a symbolic link");
    }

    #[test]
    fn a_journal_others_may_write_or_too_large_is_refused() {
        let dir = TempDir::new("journal-mode");
        let path = dir.path().join("journal");
        write(&path, &records()[0]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        refused(read_record(&path), &path, "writable by group or others");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_record(&path).unwrap(), Some(records()[0].clone()));
        // Larger than any journal: refused before it is read (a sparse file, no disk used).
        let big = dir.path().join("big");
        let f = File::create(&big).unwrap();
        f.set_len(MAX_JOURNAL_LEN + 1).unwrap();
        refused(read_record(&big), &big, "larger than");
    }

    #[test]
    fn a_directory_others_may_write_is_refused_unless_sticky() {
        let dir = TempDir::new("journal-dir");
        let sub = dir.path().join("d");
        std::fs::create_dir(&sub).unwrap();
        let path = sub.join("journal");
        write(&path, &records()[0]).unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o777)).unwrap();
        refused(read_record(&path), &path, "writable by group or others");
        let err = write(&path, &records()[1]).unwrap_err().to_string();
        assert!(err.contains("writable by group or others"), "{err}");
        // The sticky bit (as on /tmp): nobody else can rename or remove our files.
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o1777)).unwrap();
        write(&path, &records()[1]).unwrap();
        assert_eq!(read_record(&path).unwrap(), Some(records()[1].clone()));
    }

    #[test]
    fn a_device_or_a_journal_of_another_uid_is_refused() {
        if !root(
            "a_device_or_a_journal_of_another_uid_is_refused",
            "a journal chowned to another uid",
        ) {
            return;
        }
        let dir = TempDir::new("journal-owner");
        let path = dir.path().join("journal");
        // /dev/null's device numbers.
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &path,
            rustix::fs::FileType::CharacterDevice,
            Mode::RUSR | Mode::WUSR,
            rustix::fs::makedev(1, 3),
        )
        .unwrap();
        refused(read_record(&path), &path, "character device");
        std::fs::remove_file(&path).unwrap();
        write(&path, &records()[0]).unwrap();
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        refused(read_record(&path), &path, "owned by uid 65534");
    }

    /// A file planted at `<journal>.tmp` is never written through: the write succeeds, the
    /// planted entry is gone, and whatever it pointed to is unchanged.
    fn planted_tmp_is_not_written_through(tag: &str, plant: impl FnOnce(&Path, &Path)) {
        let dir = TempDir::new(tag);
        let path = dir.path().join("journal");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
        plant(&tmp_path(&path), &victim);
        let p = path.clone();
        bounded("writing the journal", move || write(&p, &records()[1])).unwrap();
        assert_eq!(read_record(&path).unwrap(), Some(records()[1].clone()));
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let mode = std::fs::metadata(&victim).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        assert!(std::fs::symlink_metadata(tmp_path(&path)).is_err());
    }

    #[test]
    fn a_symlink_at_the_tmp_path_is_not_followed() {
        planted_tmp_is_not_written_through("journal-tmp-symlink", |tmp, victim| {
            std::os::unix::fs::symlink(victim, tmp).unwrap()
        });
    }

    #[test]
    fn a_hard_link_at_the_tmp_path_is_not_written_through() {
        planted_tmp_is_not_written_through("journal-tmp-link", |tmp, victim| {
            std::fs::hard_link(victim, tmp).unwrap()
        });
    }

    #[test]
    fn a_fifo_at_the_tmp_path_does_not_block_the_write() {
        planted_tmp_is_not_written_through("journal-tmp-fifo", |tmp, _| mkfifo(tmp));
    }

    #[test]
    fn set_aside_never_replaces() {
        let dir = TempDir::new("journal-aside");
        let path = dir.path().join("journal");
        std::fs::write(&path, b"one").unwrap();
        let first = set_aside(&path, "corrupt-7").unwrap();
        assert_eq!(first, dir.path().join("journal.corrupt-7"));
        std::fs::write(&path, b"two").unwrap();
        let second = set_aside(&path, "corrupt-7").unwrap();
        assert_eq!(second, dir.path().join("journal.corrupt-7-1"));
        assert_eq!(std::fs::read(&first).unwrap(), b"one");
        assert_eq!(std::fs::read(&second).unwrap(), b"two");
        assert_eq!(read_record(&path).unwrap(), None);
        let err = set_aside(&path, "corrupt-7").unwrap_err();
        assert!(matches!(err, JournalFileError::Io { .. }), "{err:?}");
    }
}
