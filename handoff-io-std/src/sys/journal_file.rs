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
}

/// `<path>.tmp`.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(".tmp");
    PathBuf::from(s)
}

fn io_at(path: &Path) -> impl Fn(io::Error) -> JournalFileError + '_ {
    move |source| JournalFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Replace the file at `path` with `bytes`: write `<path>.tmp` (created 0600,
/// `O_CLOEXEC | O_NOFOLLOW`, truncated if a crash left one), fsync it, rename it over `path`.
/// Returns once the new content survives a crash of any process; after a machine crash the
/// file holds the new content or the old, complete (see the module's documentation).
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
    let fd = rustix::fs::open(
        &tmp,
        OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::RUSR | Mode::WUSR,
    )
    .map_err(|e| io_at(&tmp)(e.into()))?;
    // A leftover temporary file keeps its old mode through O_TRUNC: set ours.
    rustix::fs::fchmod(&fd, Mode::RUSR | Mode::WUSR).map_err(|e| io_at(&tmp)(e.into()))?;
    let mut file = File::from(fd);
    file.write_all(bytes).map_err(io_at(&tmp))?;
    file.sync_all().map_err(io_at(&tmp))?;
    drop(file);
    before_rename();
    std::fs::rename(&tmp, path).map_err(io_at(path))?;
    Ok(())
}

/// Encode `record` and [`write_atomic`] it.
pub fn write(path: &Path, record: &JournalRecord) -> Result<(), JournalFileError> {
    write_atomic(path, &journal::encode(record))
}

/// Read the journal at `path`: `Ok(None)` if there is no file, the record and the identities
/// of its pids if it decodes (either format), and [`JournalFileError::Decode`] (never a panic)
/// if it does not.
pub fn read(path: &Path) -> Result<Option<Journal>, JournalFileError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_at(path)(e)),
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
    use crate::sys::testutil::TempDir;
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
            let err = read(&path).unwrap_err();
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
            read(&path),
            Err(JournalFileError::Decode {
                source: JournalError::BadMagic,
                ..
            })
        ));
        // A directory in its place is an I/O error naming the path.
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let err = read(&sub).unwrap_err();
        assert!(matches!(err, JournalFileError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains(&sub.display().to_string()));
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
}
